"""`DNIDense`: a `keras.layers.Dense` followed by a synthetic gradient."""

import keras

from keras_dni.owned import owned_config
from keras_dni.owned import owned_synthetic_gradient
from keras_dni.synthetic_gradient import DEFAULT_SOLVER_DECAY
from keras_dni.synthetic_gradient import PREDICTION_CLIP
from keras_dni.synthetic_gradient import SOLVER_RIDGE


def _kernel_initializer(initializer, activation):
    """`kernel_initializer="auto"`: He normal for ReLU, else Glorot uniform."""
    if not (isinstance(initializer, str) and initializer == "auto"):
        return initializer
    try:
        relu = keras.activations.get(activation) is keras.activations.relu
    except (TypeError, ValueError):
        relu = False  # `Dense` reports a bad `activation` itself
    return "he_normal" if relu else "glorot_uniform"


@keras.saving.register_keras_serializable(package="keras_dni")
class DNIDense(keras.layers.Dense):
    """A `Dense` layer that learns from a synthetic gradient (DNI).

    The forward pass is exactly `keras.layers.Dense`'s, and so is inference
    cost. In training, the gradient of the loss with respect to the layer's
    output is replaced by the prediction of a small gradient model `M` (see
    `keras_dni.SyntheticGradient`): the layer's kernel and bias, and every
    layer below, are updated from `M`'s prediction, and the gradient arriving
    from above is only `M`'s regression target.

    Reference:
    - [Jaderberg et al., 2017](https://arxiv.org/abs/1608.05343)

    Args:
        units, activation, use_bias, bias_initializer, kernel_regularizer,
        bias_regularizer, activity_regularizer, kernel_constraint,
        bias_constraint, lora_rank, lora_alpha, quantization_config: as
            for `keras.layers.Dense`.
        kernel_initializer: as for `keras.layers.Dense`, or `"auto"`
            (default): `"he_normal"` for a ReLU layer (`activation="relu"`
            or `keras.activations.relu`), else `"glorot_uniform"`
            (`Dense`'s default). Under `glorot_uniform` each ReLU layer
            passes on about 0.7 of its input's RMS, and in deep cDNI
            networks the small upper-layer activations let the early
            synthetic-gradient updates kill most units; with `he_normal`
            (and the prediction clip) cDNI MLPs of 6 and 10 ReLU layers
            train within 0.7 points of backprop with Adam. With SGD and
            momentum at learning rates above 0.01, pass
            `sg_prediction_clip=1.0` (`docs/depth.md`). `get_config`
            records the initialiser chosen.
        sg_hidden_units: tuple of ints, hidden widths of the gradient model;
            `()` (default) gives a linear, zero-initialised model.
        sg_batch_norm: bool, batch normalisation in the gradient model's
            hidden layers.
        conditional: bool, conditional DNI: the gradient model also sees the
            labels (needs `DNISequential`/`DNIModel`).
        label_dim: int or `None`, width of the label features of a
            conditional layer; set automatically by `DNISequential`/`DNIModel`.
        bp_lambda: float in [0, 1], BP(lambda) mix of the incoming gradient
            into the gradient sent below (0: pure DNI, 1: backprop).
        sg_input_normalization: `"auto"` (default), `"layer"` or `None`:
            whether the gradient model sees its input standardised per
            example (`"auto"`: not for a conditional least-squares model;
            see `SyntheticGradient`).
        sg_solver: `"auto"` (default), `"least_squares"` or `"gradient"`:
            how the gradient model is fitted (see `SyntheticGradient`'s
            `solver`).
        sg_solver_decay: float in [0, 1), the least-squares solver's decay
            of past batches (see `SyntheticGradient`'s `solver_decay`).
        sg_solver_ridge: positive float, the least-squares solver's ridge
            (see `SyntheticGradient`'s `solver_ridge`).
        sg_prediction_clip: positive float or `None`, the bound on the
            synthetic gradient's norm relative to the recent targets' (see
            `SyntheticGradient`'s `prediction_clip`; with SGD, pass 1.0).
        sg_calibration: bool (default `False`), whether the synthetic
            gradient is scaled by how well the gradient model has predicted
            its recent targets (see `SyntheticGradient`'s `calibration`:
            for plain DNI in networks of up to 3 hidden layers of up to 256
            units).
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: input tensor.
        training: bool, whether the call is part of a training step.

    Input shape:
        `(batch_size, ..., input_dim)`.

    Output shape:
        `(batch_size, ..., units)`.

    Example:

    >>> import keras, keras_dni
    >>> model = keras.Sequential([
    ...     keras.Input((8,)),
    ...     keras_dni.DNIDense(32, activation="relu"),
    ...     keras.layers.Dense(3, activation="softmax"),
    ... ])
    >>> model.compile("adam", "sparse_categorical_crossentropy")
    >>> _ = model.fit(keras.random.normal((64, 8)),
    ...               keras.random.randint((64,), 0, 3), verbose=0)
    """

    def __init__(
        self,
        units,
        activation=None,
        use_bias=True,
        kernel_initializer="auto",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        lora_rank=None,
        lora_alpha=None,
        quantization_config=None,
        sg_hidden_units=(),
        sg_batch_norm=False,
        conditional=False,
        label_dim=None,
        bp_lambda=0.0,
        sg_input_normalization="auto",
        sg_solver="auto",
        sg_solver_decay=DEFAULT_SOLVER_DECAY,
        sg_solver_ridge=SOLVER_RIDGE,
        sg_prediction_clip=PREDICTION_CLIP,
        sg_calibration=False,
        **kwargs,
    ):
        super().__init__(
            units,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=_kernel_initializer(kernel_initializer, activation),
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            quantization_config=quantization_config,
            **kwargs,
        )
        self.synthetic_gradient = owned_synthetic_gradient(
            self,
            sg_hidden_units,
            sg_batch_norm,
            conditional,
            label_dim,
            bp_lambda,
            sg_input_normalization,
            sg_solver,
            sg_solver_decay,
            sg_solver_ridge,
            sg_prediction_clip,
            sg_calibration,
        )

    def build(self, input_shape):
        super().build(input_shape)
        self.synthetic_gradient.build(tuple(input_shape[:-1]) + (self.units,))

    def call(self, inputs, training=None):
        outputs = super().call(inputs, training=training)
        return self.synthetic_gradient(outputs, training=training)

    def get_config(self):
        config = owned_config(self.synthetic_gradient)
        config["activity_regularizer"] = keras.regularizers.serialize(
            self.activity_regularizer
        )
        return {**super().get_config(), **config}
