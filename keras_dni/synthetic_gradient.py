"""`SyntheticGradient`: the layer that marks a decoupling point."""

import keras
import tensorflow as tf

from keras_dni import context
from keras_dni import validation

DEFAULT_SOLVER_DECAY = "auto"
# `solver_decay="auto"`: the window of past batches holds about this many
# rows per regressor of `M`, with the current batch weighing at least half.
_ROWS_PER_REGRESSOR = 2.0
_MIN_DECAY, _MAX_DECAY = 0.5, 0.999
SOLVER_RIDGE = 1e-3
PREDICTION_CLIP = 3.0
# `calibration`: the weight the running statistics of `M`'s calibration keep
# on past batches at each step (a window of about 50 batches).
CALIBRATION_DECAY = 0.98

_TRAINING_CONTEXT_HINT = (
    "Build the model with `keras_dni.DNISequential` or `keras_dni.DNIModel` "
    "(drop-in replacements for `keras.Sequential` and `keras.Model`), whose "
    "`train_step` passes the labels and the loss scale to the layers."
)


def _decouple(finite_check):
    """Identity on `h` whose gradient is the synthetic gradient.

    Forward: returns `h`. Backward, given the incoming gradient `dy`:
    - below `h` it sends `(1 - bp_lambda) * prediction * per_example_scale +
      bp_lambda * dy` (pure DNI for `bp_lambda=0`, backprop for 1);
    - to `prediction` it returns the gradient of the regression loss
      `mean((prediction - dy / per_example_scale) ** 2)` over the global
      batch, so the gradient model M learns to predict the per-example
      gradient `dy / per_example_scale`.

    The synthetic gradient is `M`'s prediction times `factor` (the
    calibration factor, 1 without calibration); `M`'s regression uses the
    prediction itself.

    Returns `(op, holder)`: `op(h, prediction, bp_lambda, per_example_scale,
    factor)` and a dict in which the caller puts `replicas` (number of
    replicas), `on_loss(value, weight)`, called with the batch's regression
    loss when the backward pass runs, `on_target(target, weight)` (or
    `None`), called with the per-example target itself (the least-squares
    solver), and `on_sent(prediction, target, weight)`, called with both
    (the calibration statistics).
    """
    holder = {}

    @tf.custom_gradient
    def op(h, prediction, bp_lambda, per_example_scale, factor):
        def grad(dy):
            dy32 = tf.cast(dy, tf.float32)
            target = dy32 / per_example_scale
            # One scalar product: no extra pass over the prediction.
            synthetic = prediction * (factor * per_example_scale)
            down = (1.0 - bp_lambda) * synthetic + bp_lambda * dy32
            error = prediction - target
            # `per_example_scale` is loss_scale / global_batch; the regression
            # loss averages over the global batch and the features.
            local_batch = tf.cast(tf.shape(error)[0], tf.float32)
            elements = tf.cast(tf.size(error), tf.float32)
            features = elements / local_batch
            global_batch = local_batch * holder["replicas"]
            d_prediction = 2.0 * error / (global_batch * features)
            local_loss = tf.reduce_sum(tf.square(error)) / elements
            weight = 1.0
            if finite_check:
                finite = tf.reduce_all(tf.math.is_finite(dy32))
                d_prediction = tf.where(
                    finite, d_prediction, tf.zeros_like(d_prediction)
                )
                local_loss = tf.where(finite, local_loss, 0.0)
                weight = tf.cast(finite, tf.float32)
            holder["on_loss"](local_loss, weight)
            if holder.get("on_target") is not None:
                holder["on_target"](target, weight)
            holder["on_sent"](prediction, target, weight)
            return tf.cast(down, h.dtype), d_prediction, None, None, None

        return tf.identity(h), grad

    return op, holder


def _sum_over_replicas(values):
    """`values` summed over the replicas of a `tf.distribute` strategy."""
    replica = tf.distribute.get_replica_context()
    if replica is not None and replica.num_replicas_in_sync > 1:
        return replica.all_reduce("SUM", values)
    return values


def _auto_decay(rows, dim):
    """`solver_decay="auto"`: `1 - rows / (2 * dim)`, clipped."""
    return tf.clip_by_value(
        1.0 - rows / (_ROWS_PER_REGRESSOR * dim), _MIN_DECAY, _MAX_DECAY
    )


class _LabelProjection(keras.layers.Layer):
    """The label input of a conditional gradient model (a bias-free Dense).

    Its width and initialisation are set by the owning `SyntheticGradient`
    before it is built, which may happen after the owner was built.
    """

    units = None
    zero_init = True

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(input_shape[-1], self.units),
            initializer="zeros" if self.zero_init else "he_normal",
            name="kernel",
        )

    def call(self, inputs):
        return tf.matmul(inputs, self.kernel)


def _state(layer, shape, name):
    """A non-trainable float32 statistic of `layer`, zero at first."""
    return layer.add_weight(
        shape=shape,
        initializer="zeros",
        trainable=False,
        autocast=False,
        aggregation="only_first_replica",
        name=name,
    )


class _Statistics(keras.layers.Layer):
    """Running statistics of a `SyntheticGradient` (no call).

    Weights files saved before a statistic existed hold no entry for it: it
    then starts again from the next batch.
    """

    def call(self, inputs):
        return inputs

    def load_own_variables(self, store):
        if len(store.keys()):
            super().load_own_variables(store)


class _TargetNorm(_Statistics):
    """The running mean square norm of `M`'s per-example targets.

    What `prediction_clip` compares `M`'s predictions with. Zero until the
    first target arrives.
    """

    def build(self, input_shape=None):
        self.mean_square = _state(self, (), "mean_square")


class _Calibration(_Statistics):
    """Running statistics of how well `M`'s predictions match its targets.

    Exponentially weighted means (decay `CALIBRATION_DECAY`) over past
    batches of `<s, g>` and `<s, s>` per element, for the synthetic gradient
    `s` that `M` sent (after `prediction_clip`) and its target `g` (which
    arrives after `s` was sent: the statistics are out of sample). Zero
    until a batch with a nonzero prediction arrives.
    """

    def build(self, input_shape=None):
        self.product = _state(self, (), "product")
        self.energy = _state(self, (), "energy")


class _SolverState(keras.layers.Layer):
    """The running moments of the least-squares solver (no call).

    Built by the owning `SyntheticGradient` once the width of `M`'s
    regressors is known, which for a conditional layer may be after the
    owner was built.
    """

    def build(self, shape):
        inputs, outputs = shape
        self.gram = _state(self, (inputs, inputs), "gram")
        self.cross = _state(self, (inputs, outputs), "cross")

    def call(self, inputs):
        return inputs


@keras.saving.register_keras_serializable(package="keras_dni")
class SyntheticGradient(keras.layers.Layer):
    """Decouples the layers below it from the layers above it (DNI).

    Decoupled Neural Interfaces (Jaderberg et al., 2017) replace the gradient
    that a layer waits for from above with a prediction: a small gradient
    model `M` sees the activations `h` (and, for conditional DNI, the labels)
    and predicts the gradient of the loss with respect to `h`. Everything
    below this layer is updated from `M(h)` at once; the gradient that does
    arrive from above (true at the top of the network, itself synthetic
    further down) is never passed down and only serves as `M`'s regression
    target (the paper's L2 loss).

    In inference this layer is the identity and costs nothing. In training its
    output is still `h` unchanged; only the backward pass differs.

    **What `M` predicts.** `M(h)` is the *per-example* gradient of the loss:
    the gradient that arrives at `h` multiplied by the global batch size
    (local batch x number of replicas) and divided by the optimizer's loss
    scale (mixed precision). Keras losses average over the batch, so this
    target does not depend on the batch size, on the number of replicas of a
    distribution strategy, nor on the loss scale: a gradient model trained at
    batch 32 is right at batch 256 and under `tf.distribute`. The gradient
    sent below is `M(h)` scaled back the same way.

    **Training `M`.** A linear `M` (the default) is fitted in closed form
    (`solver="least_squares"`): after every batch, `M`'s weights become the
    ridge regression of the per-example gradient on `M`'s inputs over an
    exponentially weighted window of recent batches. No learning rate is
    involved, so `M` keeps up with the layers it serves at every depth and
    for any scale of its target; with a learned `M` (an optimizer step per
    batch) deep networks collapsed (see `docs/depth.md`). `M`'s weights are
    then non-trainable. With `solver="gradient"` (and always for an `M`
    with hidden layers) `M`'s weights are trainable weights: with the
    stock `train_step` the model's optimizer trains them together with the
    rest of the network; `DNISequential`/`DNIModel` give them an optimizer
    of their own (`sg_optimizer`). Under `mixed_float16` and for
    conditional DNI use `DNISequential`/`DNIModel`: their `train_step`
    tells the layer the loss scale and the labels. `M` is always computed
    in float32.

    Reference:
    - [Jaderberg et al., 2017](https://arxiv.org/abs/1608.05343)

    Args:
        hidden_units: tuple of ints, the hidden layer widths of `M`. `()`
            (default) makes `M` linear, as in the paper and the tutorial.
            Hidden layers use ReLU; the last layer of `M` is always
            zero-initialised, so `M` starts by predicting zero gradients.
        batch_norm: bool, whether `M`'s hidden layers use batch normalisation.
        conditional: bool, conditional DNI (cDNI): `M` also sees the labels
            of the batch (one-hot for integer class labels, the target values
            otherwise). Needs `DNISequential`/`DNIModel`.
        label_dim: int or `None`, the width of the label features for
            `conditional=True` (number of classes for integer labels).
            `DNISequential`/`DNIModel` set it from the model's output width
            when it is `None`.
        bp_lambda: float in [0, 1], BP(lambda): the gradient sent below is
            `(1 - bp_lambda) * synthetic + bp_lambda * incoming`. 0 (default)
            is pure DNI, 1 is exact backprop. Held in a non-trainable
            variable (`layer.bp_lambda`) that callbacks can anneal.
        input_normalization: `"auto"` (default), `"layer"` or `None`.
            With `"layer"`, `M` sees `h` standardised over its features
            (channels), per example and position, without parameters (a
            parameter-free layer norm); with `None`, `h` as it is.
            `"auto"`: `None` for a conditional `M` fitted by least squares,
            `"layer"` otherwise. A conditional `M` predicts better from the
            raw `h`, whose size and mean carry part of the gradient (how
            confident the output is, which units above are open): cDNI
            MLPs of 6-10 ReLU layers reach backprop's accuracy with it and
            lose 2-17 points on normalised `h`. Plain DNI's `M` did better
            on normalised `h` on most cells of the robustness grid, and an
            `M` trained by an optimizer needs the normalisation to keep up
            with `h` as `h` changes scale (without it, deep plain-DNI
            networks trained with Adam collapsed towards chance). Measured
            in `docs/depth.md`.
        kernel_size: int or `None`, the size of `M`'s same-padded
            `kernel_size x kernel_size` convolutions, for 4-D `h` only.
            `None` (default) gives 1 for a linear `M` (a 1x1 convolution,
            cheap) and 3 when `M` has hidden layers.
        data_format: `"channels_last"` or `"channels_first"`, where the
            channels of a 4-D `h` are; `None` (default) takes
            `keras.config.image_data_format()`. Ignored for other ranks.
        solver: how `M` is fitted to its target. `"least_squares"`: in
            closed form after every batch (linear `M` only, per position
            for 4-D `h`: `kernel_size` 1); `"gradient"`: one optimizer step
            per batch on the L2 regression loss (the paper's rule);
            `"auto"` (default): least squares wherever `M` is linear and
            per position, else gradient.
        solver_decay: `"auto"` (default) or a float in [0, 1), the weight
            that the least-squares solver keeps on past batches at each
            step (0: the current batch only). `"auto"` sets it from the
            batch: `1 - rows / (2 * dim)` clipped to [0.5, 0.999], where
            `rows` is the number of examples (times positions) in the
            global batch and `dim` the number of `M`'s regressors (features
            of `h`, label features, 1): the window holds about twice as
            many rows as `M` has weights per output, and the current batch
            weighs at least half.
        solver_ridge: positive float (default `SOLVER_RIDGE`, 1e-3), the
            least-squares solver's ridge, relative to the mean eigenvalue
            of the Gram matrix of `M`'s regressors: the fit solves
            `(G + solver_ridge * trace(G) / dim * I) W = C`. Larger values
            shrink `M`'s weights along directions the recent batches hardly
            excite (a stronger guard against extrapolating from them, at
            the cost of a biased fit).
        prediction_clip: positive float or `None` (default
            `PREDICTION_CLIP`, 3.0), a bound on the synthetic gradient sent
            below, relative to the gradients `M` was fitted on: each
            example's predicted gradient (each position's, for `h` of rank
            > 2) is scaled down where needed so that its norm is at most
            `prediction_clip` times the root mean square norm of `M`'s
            recent targets (over the least-squares solver's window of past
            batches; for `solver="gradient"`, over a window of the length
            `solver_decay="auto"` gives). `M`'s regression and its
            `sg_loss` use the prediction as sent. `None` sends `M`'s
            prediction as it is. Without it, deep cDNI networks that had
            converged sometimes diverged late in training: a small drift
            of the loss made the lower gradient models' predictions grow
            several-fold from layer to layer (see `docs/depth.md`). The
            default was chosen with Adam; with SGD and momentum at rates
            above 0.01, 3.0 let 6-layer cDNI end in NaN where 1.0 held
            (`docs/depth.md`, "SGD with momentum"): pass 1.0 there.
        calibration: bool (default `False`), whether the synthetic
            gradient sent below is `M`'s prediction `s` (after
            `prediction_clip`) times a calibration factor: the regression
            coefficient `<s, g> / <s, s>` of `M`'s targets `g` on its
            predictions, clipped to [0, 1], from running means over about
            the last 50 batches (`CALIBRATION_DECAY`), each batch measured
            before `M` is refitted on it (out of sample); 1 until `M` first
            predicts something nonzero. It is the multiple of the
            prediction that comes closest to the true gradient: near 1
            where `M` predicts its targets well, towards 0 where its
            prediction is little better than noise, which shrinks the steps
            of the layers below (with Adam, relative to their earlier
            steps). `M`'s regression and `sg_loss` use `s` itself. For
            plain DNI (no labels) in networks of 3 hidden layers of 256
            units it helped on all four data sets tried (digits 3x256: 97.0
            % against 95.6 %; MNIST subset 3x256: 90.6 % against 84.5 %); at
            4 layers it was mixed (+2.9 and -3.5 points); it hurt on two
            wide networks (3x1024, 4x512) and on four of five ReLU stacks
            of 6 or 10 layers (digits 10x128: 18 % against 47 %), where
            each layer's `M` regresses the calibrated gradient of the layer
            above, so the factors multiply down the network
            (`docs/depth.md`). Off by default for that reason.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    **Which `M` for which `h`.** `M` follows the rank of `h`:
    - 2-D `(batch, features)` (after a `Dense`): dense layers.
    - 3-D `(batch, steps, features)` (sequences): the same dense layers
      applied at every step (they see one step at a time).
    - 4-D `(batch, H, W, C)` (after a `Conv2D` or a block of them):
      convolutions, `kernel_size x kernel_size`, same-padded, with
      `hidden_units` as their numbers of filters. Start with the default, a
      linear 1x1 convolution (the gradient at each position predicted from
      the channels there), which costs little: on the MNIST CNN of
      `examples/mnist_cnn.py` it kept DNI and cDNI within about 1.3 points
      of backprop, and neither a linear 3x3 convolution nor a hidden layer
      of 64 3x3 filters with batch norm did better (the latter at several
      times the training cost). Hidden layers (`hidden_units=(64,)`,
      `batch_norm=True`) let `M` see a neighbourhood; try them when the
      cheap `M`'s regression loss (`sg_loss_<layer>`) stays high.
    - any other rank: dense layers on the last axis, at every position.
    Conditional label features are added to `M`'s first layer at every
    position.

    Call arguments:
        inputs: the activations `h`, a tensor of rank >= 2 whose first axis
            is the batch.
        training: bool, whether the call is part of a training step.

    Input shape:
        `(batch_size, ..., features)`, or `(batch_size, channels, H, W)` for
        `data_format="channels_first"`.

    Output shape:
        Same as the input.

    Example:

    >>> import keras, keras_dni
    >>> model = keras.Sequential([
    ...     keras.Input((8,)),
    ...     keras.layers.Dense(16, activation="relu"),
    ...     keras_dni.SyntheticGradient(),
    ...     keras.layers.Dense(2),
    ... ])
    >>> model.compile("adam", "mse")
    >>> _ = model.fit(keras.random.normal((32, 8)),
    ...               keras.random.normal((32, 2)), verbose=0)
    """

    def __init__(
        self,
        hidden_units=(),
        batch_norm=False,
        conditional=False,
        label_dim=None,
        bp_lambda=0.0,
        input_normalization="auto",
        kernel_size=None,
        data_format=None,
        solver="auto",
        solver_decay=DEFAULT_SOLVER_DECAY,
        solver_ridge=SOLVER_RIDGE,
        prediction_clip=PREDICTION_CLIP,
        calibration=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.calibration = validation.check_bool("calibration", calibration)
        self.solver_ridge = validation.check_positive("solver_ridge", solver_ridge)
        self.prediction_clip = validation.check_positive(
            "prediction_clip", prediction_clip, optional=True
        )
        self.solver = validation.check_choice(
            "solver", solver, ("auto", "least_squares", "gradient")
        )
        self.solver_decay = validation.check_decay("solver_decay", solver_decay)
        self.input_normalization = validation.check_choice(
            "input_normalization", input_normalization, ("auto", "layer", None)
        )
        self.hidden_units = validation.check_hidden_units("hidden_units", hidden_units)
        if self.solver == "least_squares" and self.hidden_units:
            raise ValueError(
                "`solver='least_squares'` fits a linear gradient model in "
                "closed form; it needs `hidden_units=()`. Use "
                "`solver='gradient'` (or 'auto') for a gradient model with "
                f"hidden layers. Received: hidden_units={self.hidden_units!r}"
            )
        self.batch_norm = validation.check_bool("batch_norm", batch_norm)
        self.conditional = validation.check_bool("conditional", conditional)
        self.label_dim = validation.check_optional_positive_int("label_dim", label_dim)
        self.initial_bp_lambda = validation.check_fraction("bp_lambda", bp_lambda)
        self.kernel_size = validation.check_optional_positive_int(
            "kernel_size", kernel_size
        )
        if data_format is None:
            data_format = keras.config.image_data_format()
        self.data_format = validation.check_choice(
            "data_format", data_format, ("channels_last", "channels_first")
        )
        self.supports_masking = True
        # Name used for this layer's metric; a DNI layer that owns this one
        # sets it to its own name.
        self.metric_prefix_name = self.name
        # Created unbuilt: the label width may only be known once the model
        # around this layer is complete (see `set_label_dim`).
        self._label_projection = (
            _LabelProjection(dtype="float32", name="gradient_model_labels")
            if self.conditional
            else None
        )
        self._solver_state = _SolverState(dtype="float32", name="solver_state")
        self._target_norm = _TargetNorm(dtype="float32", name="target_norm")
        self._calibration = _Calibration(dtype="float32", name="calibration")

    # ------------------------------------------------------------------ build
    def build(self, input_shape):
        rank = len(input_shape)
        self._convolutional = rank == 4
        if self.kernel_size is not None and not self._convolutional:
            raise ValueError(
                "Received `kernel_size`, which only applies to 4-D inputs "
                "(images), but the input of layer "
                f"'{self.metric_prefix_name}' has rank {rank}. Leave "
                f"`kernel_size` as `None`. Received: input_shape={input_shape}"
            )
        channels_first = self._convolutional and self.data_format == "channels_first"
        features = input_shape[1] if channels_first else input_shape[-1]
        if features is None:
            raise ValueError(
                "`SyntheticGradient` needs a known number of features "
                "(channels) in its input. "
                f"Received: input_shape={input_shape}"
            )
        # `M` works channels-last: its input is `h` as `predict_gradient`
        # lays it out.
        inner = tuple(input_shape[2:] if channels_first else input_shape[1:-1])
        batch = input_shape[0]
        self.bp_lambda = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.initial_bp_lambda),
            trainable=False,
            dtype="float32",
            autocast=False,
            name="bp_lambda",
        )
        widths = self.hidden_units + (features,)
        linear = not self.hidden_units
        # The first layer of `M` (a Dense, or a Conv2D for 4-D inputs). The
        # attribute keeps its name so that saved files stay loadable.
        self._input_dense = self._weight_layer(
            widths[0], zero_init=linear, name="gradient_model_input"
        )
        self._input_dense.build((batch,) + inner + (features,))
        self._model_layers = []
        width = widths[0]
        for i, units in enumerate(widths[1:]):
            if self.batch_norm:
                bn = keras.layers.BatchNormalization(
                    dtype="float32", name=f"gradient_model_bn_{i}"
                )
                bn.build((batch,) + inner + (width,))
                self._model_layers.append(bn)
            last = i == len(widths) - 2
            kind = "conv" if self._convolutional else "dense"
            layer = self._weight_layer(
                units, zero_init=last, name=f"gradient_model_{kind}_{i}"
            )
            layer.build((batch,) + inner + (width,))
            self._model_layers.append(layer)
            width = units
        self._least_squares = self._resolve_solver()
        # Resolved with the solver: raw `h` for a conditional least-squares
        # `M` (docs/depth.md).
        self._normalize_inputs = self.input_normalization == "layer" or (
            self.input_normalization == "auto"
            and not (self._least_squares and self.conditional)
        )
        if self._least_squares:
            # Fitted in closed form (`_solve`), not by an optimizer.
            self._input_dense.trainable = False
            if self._label_projection is not None:
                self._label_projection.trainable = False
        if self.conditional and self.label_dim is not None:
            self._build_label_projection()
        elif not self.conditional:
            self._build_solver()
        self._target_norm.build()
        self._calibration.build()
        self.sg_loss_tracker = keras.metrics.Mean(
            name=f"sg_loss_{self.metric_prefix_name}"
        )

    def _weight_layer(self, units, zero_init, name):
        """One layer of `M`: a Dense, or a same-padded Conv2D for 4-D h."""
        initializer = "zeros" if zero_init else "he_normal"
        if self._convolutional:
            kernel_size = self.kernel_size
            if kernel_size is None:
                kernel_size = 3 if self.hidden_units else 1
            return keras.layers.Conv2D(
                units,
                kernel_size,
                padding="same",
                data_format="channels_last",
                kernel_initializer=initializer,
                dtype="float32",
                name=name,
            )
        return keras.layers.Dense(
            units, kernel_initializer=initializer, dtype="float32", name=name
        )

    def _build_label_projection(self):
        first = self._input_dense
        self._label_projection.units = (
            first.filters if isinstance(first, keras.layers.Conv2D) else first.units
        )
        self._label_projection.zero_init = not self.hidden_units
        self._label_projection.build((None, self.label_dim))
        self._build_solver()

    def _resolve_solver(self):
        """Whether `M` is fitted by least squares (`solver`, at build)."""
        per_position = not self._convolutional or self.kernel_size in (None, 1)
        if self.solver == "least_squares" and not per_position:
            raise ValueError(
                "`solver='least_squares'` needs a gradient model that is "
                "linear in the channels at each position; a "
                f"{self.kernel_size}x{self.kernel_size} convolution is not. "
                "Use `kernel_size=1`, or `solver='gradient'`. Received: "
                f"kernel_size={self.kernel_size!r}"
            )
        if self.solver == "auto":
            return not self.hidden_units and per_position
        return self.solver == "least_squares"

    def _build_solver(self):
        """The running moments of the least-squares solver, once sized."""
        if not self._least_squares:
            return
        first = self._input_dense
        outputs = (
            first.filters if isinstance(first, keras.layers.Conv2D) else first.units
        )
        inputs = first.kernel.shape[-2] + (self.label_dim or 0) + 1
        self._solver_state.build((inputs, outputs))

    @property
    def least_squares(self):
        """Whether `M` is fitted by least squares (known once built)."""
        if not self.built:
            raise ValueError(
                f"Layer '{self.metric_prefix_name}' is not built yet: whether "
                "`solver='auto'` means least squares depends on its input."
            )
        return self._least_squares

    def set_label_dim(self, label_dim):
        """Sets the label width of a conditional layer that has none yet.

        `DNISequential`/`DNIModel` call it with the model's output width.
        """
        if not self.conditional or self.label_dim is not None:
            return
        self.label_dim = validation.check_optional_positive_int("label_dim", label_dim)
        if self.built:
            self._build_label_projection()

    # ------------------------------------------------------------- gradient M
    def predict_gradient(self, inputs, labels=None):
        """`M`'s prediction of the per-example gradient at `inputs`.

        Args:
            inputs: the activations `h`.
            labels: the batch's targets, for a conditional layer.

        Returns:
            A float32 tensor shaped like `inputs`.
        """
        return self._predict(self._model_inputs(inputs), labels)

    def sent_gradient(self, inputs, labels=None):
        """The per-example synthetic gradient sent below `inputs` in training.

        `M`'s prediction (`predict_gradient`) after `prediction_clip`; the
        gradient a training step sends is this divided by the global batch
        size (and times the loss scale).

        Args:
            inputs: the activations `h`.
            labels: the batch's targets, for a conditional layer.

        Returns:
            A float32 tensor shaped like `inputs`.
        """
        return self.calibration_factor() * self._clip(
            self.predict_gradient(inputs, labels)
        )

    def calibration_factor(self):
        """The factor the synthetic gradient is multiplied by (`calibration`).

        Returns:
            A float32 scalar: `<s, g> / <s, s>` over the recent batches,
            clipped to [0, 1]; 1 without calibration or statistics.
        """
        if not self.calibration:
            return tf.constant(1.0)
        product = tf.convert_to_tensor(self._calibration.product)
        energy = tf.convert_to_tensor(self._calibration.energy)
        ratio = tf.clip_by_value(product / tf.maximum(energy, 1e-30), 0.0, 1.0)
        return tf.where(energy > 0.0, ratio, 1.0)

    def record_calibration(self, prediction, target, weight=1.0):
        """Updates the statistics of `calibration_factor` with one batch.

        Args:
            prediction: what `M` sent for the batch (after `prediction_clip`,
                before the calibration factor), per example.
            target: the per-example gradient that arrived for it.
            weight: 0 to skip the batch (a non-finite gradient), else 1.
        """
        if not self.calibration:
            return
        weight = tf.cast(weight, tf.float32)
        prediction = tf.cast(prediction, tf.float32)
        target = tf.cast(target, tf.float32)
        elements = tf.cast(tf.size(prediction), tf.float32)
        product = tf.reduce_sum(prediction * target) / elements
        energy = tf.reduce_sum(tf.square(prediction)) / elements
        product, energy = _sum_over_replicas([product, energy])
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        product, energy = product / replicas, energy / replicas
        use = tf.logical_and(weight > 0.0, energy > 0.0)
        use = tf.logical_and(use, tf.math.is_finite(product))
        old_product = tf.convert_to_tensor(self._calibration.product)
        old_energy = tf.convert_to_tensor(self._calibration.energy)
        # The first batch with a prediction sets the statistics.
        keep = tf.where(old_energy > 0.0, CALIBRATION_DECAY, 0.0)
        self._calibration.product.assign(
            tf.where(use, keep * old_product + (1.0 - keep) * product, old_product)
        )
        self._calibration.energy.assign(
            tf.where(use, keep * old_energy + (1.0 - keep) * energy, old_energy)
        )

    def _channels_first(self):
        return self._convolutional and self.data_format == "channels_first"

    def _model_inputs(self, inputs):
        """`h` as `M`'s first layer sees it: float32, channels-last, normalised."""
        x = tf.cast(inputs, tf.float32)
        if self._channels_first():
            x = tf.transpose(x, [0, 2, 3, 1])
        if self._normalize_inputs:
            # Over the channels (features), per example and per position
            # (time step, pixel): the same rule for every rank, which matches
            # the per-position 1x1 default of 4-D h. For 4-D h we also tried
            # one mean and variance per example over (H, W, C), which keeps
            # the differences in scale between positions: on the MNIST CNN
            # example (4 seeds) it was 0.3 points worse for DNI and cDNI,
            # within the noise, so the simpler rule stays.
            axes = [-1]
            mean, var = tf.nn.moments(x, axes=axes, keepdims=True)
            x = (x - mean) * tf.math.rsqrt(var + 1e-6)
        return x

    def _predict(self, x, labels):
        """`M`'s prediction from its inputs `x` (see `_model_inputs`)."""
        x = self._input_dense(x)
        if self.conditional:
            x = x + self._label_features(labels, x)
        hidden = bool(self.hidden_units)
        for layer in self._model_layers:
            if hidden and isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
                x = tf.nn.relu(x)
            x = (
                layer(x, training=True)
                if isinstance(layer, keras.layers.BatchNormalization)
                else layer(x)
            )
        if self._channels_first():
            x = tf.transpose(x, [0, 3, 1, 2])
        return x

    def _label_features(self, labels, inputs):
        projected = self._label_projection(self._label_inputs(labels))
        return self._broadcast_labels(projected, inputs)

    def _broadcast_labels(self, projected, inputs):
        """Per-example label features, broadcast over the inner axes of h."""
        rank = inputs.shape.rank
        if rank is not None and rank > 2:
            new_shape = tf.concat(
                [
                    tf.shape(projected)[:1],
                    tf.ones([rank - 2], tf.int32),
                    tf.shape(projected)[1:],
                ],
                axis=0,
            )
            projected = tf.reshape(projected, new_shape)
        return projected

    def _label_inputs(self, labels):
        """The labels as `M`'s label input: one-hot classes, or the targets."""
        if labels is None:
            raise ValueError(
                f"The conditional layer '{self.metric_prefix_name}' "
                "(`conditional=True`) received no labels during training: a "
                "plain `keras.Sequential`/`keras.Model` does not pass them to "
                "its layers. " + _TRAINING_CONTEXT_HINT
            )
        if isinstance(labels, (dict, list, tuple)):
            raise ValueError(
                f"The conditional layer '{self.metric_prefix_name}' needs a "
                "single label tensor; received a structure of "
                f"{type(labels).__name__}."
            )
        if not self._label_projection.built:
            raise ValueError(
                f"The conditional layer '{self.metric_prefix_name}' does not "
                "know the width of its label features. Pass `label_dim` or "
                "use `DNISequential`/`DNIModel`, which set it from the "
                "model's output width."
            )
        labels = tf.convert_to_tensor(labels)
        if labels.dtype.is_integer:
            if labels.shape.rank is not None and labels.shape.rank > 1:
                labels = tf.reshape(labels, [tf.shape(labels)[0]])
            features = tf.one_hot(labels, self.label_dim, dtype=tf.float32)
        else:
            # The static width: the least-squares regressors need it.
            features = tf.reshape(
                tf.cast(labels, tf.float32), [tf.shape(labels)[0], self.label_dim]
            )
        return features

    # ------------------------------------------------ least-squares solver
    def least_squares_features(self, inputs, labels=None):
        """The regressors of a least-squares `M` at `inputs` (`h`).

        Rows `[h as M sees it, label inputs, 1]`, one per example (and per
        position for `h` of rank > 2), for `fit_least_squares`.
        """
        return self._solver_features(self._model_inputs(inputs), labels)

    def _solver_features(self, x, labels):
        """Rows of `M`'s regressors: `[x, label inputs, 1]` per position."""
        parts = [x]
        if self.conditional:
            label_inputs = self._label_inputs(labels)
            label_inputs = self._broadcast_labels(label_inputs, x)
            parts.append(
                label_inputs * tf.ones_like(x[..., :1])
                if x.shape.rank > 2
                else label_inputs
            )
        parts.append(tf.ones_like(x[..., :1]))
        features = tf.concat(parts, axis=-1)
        return tf.reshape(features, [-1, features.shape[-1]])

    def fit_least_squares(self, features, target, weight=1.0):
        """Refits a least-squares `M` on one more batch (closed form).

        `M` is the ridge regression of the per-example gradient on its
        regressors (`h` as `M` sees it, the label inputs of a conditional
        layer, and 1 for the bias), over an exponentially weighted window
        of recent batches: with decay `solver_decay`, the moments
        `G <- decay * G + (1 - decay) * Z^T Z / n` and `C <- decay * C +
        (1 - decay) * Z^T T / n` are updated and `M`'s weights set to
        `(G + ridge * trace(G) / dim * I)^-1 C` (ridge `solver_ridge`);
        with `solver_decay="auto"` the decay is `1 - n / (2 * dim)`,
        clipped to [0.5, 0.999], for `n` rows and `dim` regressors.
        Under `tf.distribute` the batch moments are summed over replicas.

        Args:
            features: the regressors, `(rows, dim)`, from the forward pass.
            target: the per-example gradient at `h` (layout of `h`).
            weight: 0 to skip the batch (a non-finite gradient), else 1.
        """
        self.update_from_moments(self.batch_moments(target, weight, features), weight)

    def record_targets(self, target, weight=1.0):
        """Updates the running norm of `M`'s targets (`prediction_clip`).

        For an `M` trained by `sg_optimizer`; `fit_least_squares` does it
        for a least-squares `M`. The window is the one `solver_decay="auto"`
        gives.

        Args:
            target: the per-example gradient at `h` (layout of `h`).
            weight: 0 to skip the batch (a non-finite gradient), else 1.
        """
        self.update_from_moments(self.batch_moments(target, weight), weight)

    def batch_moments(self, target, weight=1.0, features=None):
        """What one batch adds to `M`'s running state, summed over replicas.

        `update_from_moments` applies it. Splitting the two lets a training
        step reduce a batch where its target arrives and decide later
        (`update_probability`) whether `M` takes it in, without holding the
        per-example tensors until then.

        Args:
            target: the per-example gradient at `h` (layout of `h`).
            weight: 0 for a non-finite gradient (its rows count as zeros).
            features: the regressors of a least-squares `M`, `(rows, dim)`.

        Returns:
            `(rows, energy)` of the targets; with `features` also the
            moments `Z^T Z` and `Z^T T`.
        """
        weight = tf.cast(weight, tf.float32)
        target = self._target_rows(target, weight)
        rows = tf.cast(tf.shape(target)[0], tf.float32)
        energy = tf.reduce_sum(tf.square(target))
        if features is None:
            return tuple(_sum_over_replicas([rows, energy]))
        gram = tf.matmul(features, features, transpose_a=True)
        cross = tf.matmul(features, target, transpose_a=True)
        return tuple(_sum_over_replicas([rows, energy, gram, cross]))

    def update_from_moments(self, moments, weight=1.0):
        """Takes one batch's `batch_moments` into `M`'s state.

        The running norm of the targets; for the four moments of a
        least-squares `M` also its running moments, and its weights refitted.

        Args:
            moments: what `batch_moments` returned for the batch.
            weight: 0 to skip the batch (`M`'s state stays as it is), else 1.
        """
        weight = tf.cast(weight, tf.float32)
        if len(moments) == 2:
            rows, energy = moments
            dim = self._input_dense.kernel.shape[-2] + (self.label_dim or 0) + 1
            decay = _auto_decay(rows, dim)
            keep = decay + (1.0 - decay) * (1.0 - weight)
            self._update_target_norm(energy, rows, keep, weight)
            return
        rows, energy, gram, cross = moments
        dim = gram.shape[-1]
        decay = self.solver_decay
        if decay == "auto":
            decay = _auto_decay(rows, dim)
        keep = decay + (1.0 - decay) * (1.0 - weight)
        add = (1.0 - decay) * weight / tf.maximum(rows, 1.0)
        self._update_target_norm(energy, rows, keep, weight)
        state = self._solver_state
        gram = keep * state.gram + add * gram
        cross = keep * state.cross + add * cross
        state.gram.assign(gram)
        state.cross.assign(cross)
        ridge = self.solver_ridge * tf.linalg.trace(gram) / dim + 1e-12
        chol = tf.linalg.cholesky(gram + ridge * tf.eye(dim))
        solution = tf.linalg.cholesky_solve(chol, cross)
        self._assign_solution(solution, weight <= 0.0)

    def _target_rows(self, target, weight):
        """`target` as rows of channels; zeros for a skipped batch.

        (`0 * inf` would otherwise put NaN in the running moments.)
        """
        target = tf.cast(target, tf.float32)
        if self._channels_first():
            target = tf.transpose(target, [0, 2, 3, 1])
        target = tf.reshape(target, [-1, target.shape[-1]])
        return tf.where(weight > 0.0, target, tf.zeros_like(target))

    def _update_target_norm(self, energy, rows, keep, weight):
        """`mean_square <- keep * mean_square + (1 - keep) * energy / rows`.

        The first batch with a target sets it.
        """
        variable = self._target_norm.mean_square
        batch = energy / tf.maximum(rows, 1.0)
        old = tf.convert_to_tensor(variable)
        variable.assign(
            tf.where(old > 0.0, keep * old + (1.0 - keep) * batch, weight * batch)
        )

    def _clip(self, prediction):
        """`prediction` scaled down where its norm exceeds the bound."""
        if self.prediction_clip is None:
            return prediction
        mean_square = tf.convert_to_tensor(self._target_norm.mean_square)
        axis = 1 if self._channels_first() else -1
        norm = tf.norm(prediction, axis=axis, keepdims=True)
        limit = self.prediction_clip * tf.sqrt(mean_square)
        factor = tf.minimum(1.0, limit / tf.maximum(norm, 1e-30))
        factor = tf.where(mean_square > 0.0, factor, tf.ones_like(factor))
        return prediction * tf.stop_gradient(factor)

    def _assign_solution(self, solution, skip):
        """Sets `M`'s weights; with `skip` (weight 0) `M` stays as it is."""

        def put(variable, value):
            variable.assign(tf.where(skip, tf.convert_to_tensor(variable), value))

        kernel = self._input_dense.kernel
        inputs = kernel.shape[-2]
        put(kernel, tf.reshape(solution[:inputs], kernel.shape))
        if self.conditional:
            put(
                self._label_projection.kernel,
                solution[inputs : inputs + self.label_dim],
            )
        put(self._input_dense.bias, solution[-1])

    # ------------------------------------------------------------------- call
    def call(self, inputs, training=None):
        if not training:
            return inputs
        ctx = context.current()
        loss_scale = None
        labels = None
        if ctx is not None:
            loss_scale = ctx.loss_scale
            labels = ctx.labels
        elif self.compute_dtype == "float16":
            raise ValueError(
                f"Layer '{self.metric_prefix_name}' is trained under the "
                "'mixed_float16' policy with the stock `train_step`: the "
                "gradients it receives carry the optimizer's loss scale, "
                "which a layer cannot see. " + _TRAINING_CONTEXT_HINT
            )
        x = self._model_inputs(tf.stop_gradient(inputs))
        prediction = self._clip(self._predict(x, labels))
        if ctx is not None and ctx.force_backprop:
            output = tf.identity(inputs)
            ctx.records.append((self, output, prediction))
            return output

        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        global_batch = tf.cast(tf.shape(inputs)[0] * replicas, tf.float32)
        scale = 1.0 if loss_scale is None else tf.cast(loss_scale, tf.float32)
        per_example_scale = scale / global_batch
        op, holder = _decouple(finite_check=loss_scale is not None)
        holder["replicas"] = float(replicas)
        holder["on_loss"] = self._record_loss
        holder["on_sent"] = self.record_calibration
        features = self._solver_features(x, labels) if self._least_squares else None
        if ctx is not None:
            # The DNI `train_step` updates M's state (a least-squares fit, the
            # targets' norm) after the backward pass, so that a stage that
            # skips its update keeps it; the batch is reduced here.
            def on_target(target, weight):
                moments = self.batch_moments(target, weight, features)
                ctx.solver_fits.append((self, moments, weight))
        elif self._least_squares:

            def on_target(target, weight):
                self.fit_least_squares(features, target, weight)
        else:
            on_target = self.record_targets
        holder["on_target"] = on_target
        output = op(
            inputs,
            prediction,
            tf.convert_to_tensor(self.bp_lambda),
            per_example_scale,
            self.calibration_factor(),
        )
        if ctx is not None:
            ctx.records.append((self, output, prediction))
        return output

    def _record_loss(self, value, weight):
        self.sg_loss_tracker.update_state(value, sample_weight=weight)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = {
            "hidden_units": self.hidden_units,
            "batch_norm": self.batch_norm,
            "conditional": self.conditional,
            "label_dim": self.label_dim,
            "bp_lambda": self.initial_bp_lambda,
            "input_normalization": self.input_normalization,
            "kernel_size": self.kernel_size,
            "data_format": self.data_format,
            "solver": self.solver,
            "solver_decay": self.solver_decay,
            "solver_ridge": self.solver_ridge,
            "prediction_clip": self.prediction_clip,
            "calibration": self.calibration,
        }
        return {**super().get_config(), **config}
