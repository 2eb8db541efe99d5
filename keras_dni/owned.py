"""The `SyntheticGradient` that a DNI layer (`DNIDense`, `DNIConv2D`) owns.

Shared by the DNI layers so that their `sg_*` arguments are validated, named
and serialised the same way.
"""

from keras_dni import validation
from keras_dni.synthetic_gradient import DEFAULT_SOLVER_DECAY
from keras_dni.synthetic_gradient import PREDICTION_CLIP
from keras_dni.synthetic_gradient import SOLVER_RIDGE
from keras_dni.synthetic_gradient import SyntheticGradient


def owned_synthetic_gradient(
    owner,
    sg_hidden_units,
    sg_batch_norm,
    conditional,
    label_dim,
    bp_lambda,
    sg_input_normalization,
    sg_solver="auto",
    sg_solver_decay=DEFAULT_SOLVER_DECAY,
    sg_solver_ridge=SOLVER_RIDGE,
    sg_prediction_clip=PREDICTION_CLIP,
    sg_calibration=False,
    **extra,
):
    """Creates the `SyntheticGradient` child of DNI layer `owner`.

    Arguments are checked here so that errors name the owner's arguments
    (`sg_hidden_units`, ...). `extra` goes to `SyntheticGradient` as is.
    """
    layer = SyntheticGradient(
        hidden_units=validation.check_hidden_units("sg_hidden_units", sg_hidden_units),
        batch_norm=validation.check_bool("sg_batch_norm", sg_batch_norm),
        conditional=conditional,
        label_dim=label_dim,
        bp_lambda=bp_lambda,
        input_normalization=validation.check_choice(
            "sg_input_normalization",
            sg_input_normalization,
            ("auto", "layer", None),
        ),
        solver=validation.check_choice(
            "sg_solver", sg_solver, ("auto", "least_squares", "gradient")
        ),
        solver_decay=validation.check_decay("sg_solver_decay", sg_solver_decay),
        solver_ridge=validation.check_positive("sg_solver_ridge", sg_solver_ridge),
        prediction_clip=validation.check_positive(
            "sg_prediction_clip", sg_prediction_clip, optional=True
        ),
        calibration=validation.check_bool("sg_calibration", sg_calibration),
        dtype=owner.dtype_policy,
        name="synthetic_gradient",
        **extra,
    )
    # The owner's name labels the metric (`sg_loss_<owner>`) and messages.
    layer.metric_prefix_name = owner.name
    return layer


def owned_config(layer):
    """The owner's `sg_*` constructor arguments, read back from `layer`."""
    return {
        "sg_hidden_units": layer.hidden_units,
        "sg_batch_norm": layer.batch_norm,
        "conditional": layer.conditional,
        "label_dim": layer.label_dim,
        "bp_lambda": layer.initial_bp_lambda,
        "sg_input_normalization": layer.input_normalization,
        "sg_solver": layer.solver,
        "sg_solver_decay": layer.solver_decay,
        "sg_solver_ridge": layer.solver_ridge,
        "sg_prediction_clip": layer.prediction_clip,
        "sg_calibration": layer.calibration,
    }
