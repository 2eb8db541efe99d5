"""`DNIRNN`: truncated BPTT with synthetic gradients at the truncation points."""

import numbers

import keras
import tensorflow as tf

from keras_dni import context
from keras_dni import validation
from keras_dni.synthetic_gradient import SyntheticGradient

# `DNIRNN`'s default `sg_prediction_clip` (see its docstring).
RECURRENT_PREDICTION_CLIP = 1.0


def _check_truncation(value):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            "Received an invalid value for `truncation`, expected a positive "
            "integer (the number of time steps per truncated-BPTT chunk). "
            f"Received: truncation={value!r}"
        )
    return int(value)


def _check_stream_discount(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            "Received an invalid value for `stream_discount`, expected a "
            "float in [0, 1] (the discount of the synthetic gradient at the "
            f"end of a stateful batch). Received: stream_discount={value!r}"
        )
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            "Received an invalid value for `stream_discount`, expected a "
            "float in [0, 1] (the discount of the synthetic gradient at the "
            f"end of a stateful batch). Received: stream_discount={value!r}"
        )
    return float(value)


def _check_aux_weight(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            "Received an invalid value for `aux_weight`, expected a "
            f"non-negative float. Received: aux_weight={value!r}"
        )
    if not float(value) >= 0.0:
        raise ValueError(
            "Received an invalid value for `aux_weight`, expected a "
            f"non-negative float. Received: aux_weight={value!r}"
        )
    return float(value)


def _attach_aux_gradient(carrier, prediction, target, scale):
    """Identity on `carrier`; `prediction` gets `scale * 2 (prediction - target) / F`.

    The gradient of `scale * sum_examples mean_features (prediction -
    target)^2` with respect to `prediction` (`target` is a constant), sent
    when the backward pass reaches `carrier`, which only carries the
    dependency (its own gradient passes through unchanged).
    """

    @tf.custom_gradient
    def op(carrier, prediction):
        def grad(dy):
            features = tf.cast(tf.shape(prediction)[-1], tf.float32)
            error = tf.cast(prediction, tf.float32) - tf.cast(target, tf.float32)
            d_prediction = scale * 2.0 * error / features
            return dy, tf.cast(d_prediction, prediction.dtype)

        return tf.identity(carrier), grad

    return op(carrier, prediction)


def _inject_future_gradient(output, state, prediction, per_example_scale, weight):
    """Identity on `output`; adds `M(state)` as the gradient of `state`.

    Used at the end of a batch of a stateful layer: the state goes on to the
    next batch, whose gradient does not exist yet, so `state` receives
    `weight * prediction * per_example_scale` (the synthetic gradient of the
    future) in addition to the gradients it gets inside the batch. `output`
    only carries the dependency: its gradient passes through unchanged.
    """

    @tf.custom_gradient
    def op(output, state):
        def grad(dy):
            synthetic = weight * prediction * per_example_scale
            return dy, tf.cast(synthetic, state.dtype)

        return tf.identity(output), grad

    return op(output, state)


@keras.saving.register_keras_serializable(package="keras_dni")
class DNIRNN(keras.layers.Layer):
    """Truncated BPTT whose truncation points get a synthetic gradient (DNI).

    Runs a Keras RNN cell (`keras.layers.LSTMCell`, `GRUCell`,
    `SimpleRNNCell`, a `StackedRNNCells`, or any cell with the same API) over
    a sequence in chunks of `truncation` time steps. Gradients do not cross
    the border between two chunks (truncated backpropagation through time).
    With `synthetic_gradient=True` (recurrent DNI, Jaderberg et al. 2017,
    section 3.2) a small gradient model `M` sees the recurrent state `s` at
    each border and predicts the gradient of the loss of all later time steps
    with respect to `s`; the chunk before the border is trained with `M(s)`
    as that gradient, so it learns from the future beyond the truncation
    window. `M` is trained by regression on the gradient that does arrive at
    the border from the next chunk, which itself contains the synthetic
    gradient at that chunk's own end (bootstrapping, as in TD learning).
    For an LSTM the state is `[h, c]`: `M` sees the concatenated state and
    predicts the gradient for all of it.

    `M` is a `keras_dni.SyntheticGradient` owned by this layer
    (`layer.synthetic_gradient`), so everything said there holds here: `M`
    predicts the *per-example* gradient (the incoming gradient times the
    global batch size, divided by the loss scale), its weights are trainable
    weights of this layer, `keras_dni.synthetic_gradient_layers` finds it,
    `DNISequential`/`DNIModel` train it with their `sg_optimizer` and report
    its loss as `sg_loss_<this layer's name>` (mean over the borders).

    **End of the sequence.** A non-stateful layer sees complete sequences:
    no loss lies beyond the last time step, so the gradient of the future at
    the last state is exactly zero and no synthetic gradient is added there
    (`M` is neither used nor trained at the sequence's ends). A stateful
    layer carries its state into the next batch: the last state of a batch
    receives `M(s)` (the gradient that the next batch will produce), and `M`
    is trained on that gradient when it arrives, at the start of the next
    batch, on the same state `s`.

    **Endless streams.** On a stream (`stateful=True`, never reset) nothing
    ends the bootstrapping. Two arguments keep it stable (measured on the
    copy task as one stream, `keras_dni.benchmarks.streams`; see
    docs/recurrent.md). `stream_discount` (gamma) discounts the synthetic
    gradient at the end of each batch: the batch's last state receives
    `gamma * M(s)`, so `M`'s target becomes the TD(gamma) target `g +
    gamma * J^T M(s')` and `M` predicts the gradient of the discounted
    future loss `L_1 + gamma L_2 + gamma^2 L_3 + ...` (batches ahead), which
    stays bounded while `gamma` times the chunk's Jacobian norm stays below
    1. `sg_states` picks the states that receive `M`'s prediction: by
    default a stateful layer injects it only into each cell's output state
    (`h` of an LSTM), not into the LSTM's cell state `c`. `c` has no
    squashing nonlinearity; with `M`'s prediction on `c`, the network drove
    `c` (and with it `M`, which is linear in `c`) to norms of 1e3 to 1e4
    within a few hundred steps, with or without a discount. `M` still sees
    and regresses the whole state.

    **DNI + Aux** (`aux=True`; the paper's auxiliary task, section 3.2): a
    linear head `A` on the state `s_k` at each border inside the batch
    predicts `M(s_{k+1})`, the synthetic gradient at the next border (`T`
    steps later; 0 past the end of a non-stateful sequence, `M(last state)`
    past the last chunk of a stateful batch). Its loss, `aux_weight` times
    the mean over the borders of the mean squared error (per example,
    averaged over the batch), trains `A` and, through `s_k`, the chunk that
    produced `s_k`; the target is a constant. The auxiliary gradient is
    part of the gradient that reaches the border before, so `M`'s target
    includes it. A batch of a single chunk has no inner border and no
    auxiliary loss. In inference `aux` changes nothing.

    `synthetic_gradient=False` gives plain truncated BPTT with the same
    chunking, the baseline of the paper. With `bp_lambda=1` gradients cross
    the borders within a batch (full BPTT). In inference the layer computes
    exactly what `keras.layers.RNN(cell)` computes.

    Not supported (use `keras.layers.RNN` where you need them): masking,
    `return_state`, `go_backwards`, an `initial_state` argument, and inputs
    whose number of time steps is unknown when the layer is traced.

    Reference:
    - [Jaderberg et al., 2017](https://arxiv.org/abs/1608.05343)

    Args:
        cell: a Keras RNN cell instance (it must have `call(inputs, states)`
            and `state_size`).
        truncation: positive int, the number of time steps per chunk `T`.
            Chunks start at time step 0; the last chunk may be shorter.
        synthetic_gradient: bool, whether the borders between chunks get a
            synthetic gradient (`True`, DNI) or none (`False`, truncated BPTT).
        return_sequences: bool, return the output of every time step
            (`True`) or only the last (`False`).
        stateful: bool, carry the last state of each batch into the next
            (sample `i` of a batch continues sample `i` of the previous
            batch). Needs a static batch size; `reset_state()` zeroes the
            state. The synthetic gradient continues across batches (see
            above), discounted by `stream_discount`.
        sg_hidden_units: tuple of ints, hidden widths of `M`; `()` (default)
            gives a linear, zero-initialised `M` as in the paper.
        sg_input_normalization: `None` (default) or `"layer"`: whether `M`
            sees the state standardised per example (see
            `keras_dni.SyntheticGradient`). Unlike `SyntheticGradient`, the
            default is `None`: an LSTM state is already bounded, and on the
            copy task (T=3, N=3, one seed) `M` on the raw state trained the
            network to 2.6 bits per step in 2500 steps against 4.1 with
            `"layer"` (truncated BPTT: 6.0).
        bp_lambda: float in [0, 1], BP(lambda): the gradient sent into a
            chunk at its end is `(1 - bp_lambda) * M(s) + bp_lambda *
            incoming` (0: DNI, 1: gradients cross the borders).
        stream_discount: float in [0, 1], gamma: a stateful layer's last
            state of a batch receives `gamma * (1 - bp_lambda) * M(s)`
            (see "Endless streams"); no effect without `stateful=True`.
            Default 0.5: on the copy stream at T = 2 with one chunk per
            batch, 0.9 left the cell state drifting (norm 7e3 after 20,000
            steps) and the network at chance, while 0.5 stayed bounded and
            learned at T = 2, 5 and 8; 1.0 is the undiscounted future.
        sg_states: which recurrent states get `M`'s prediction as their
            gradient at a border: `"all"`, `"outputs"` (each cell's first
            state, its output: `h` of an LSTM; a GRU's or SimpleRNN's state
            is all output) or `"auto"` (default): `"outputs"` when
            `stateful=True`, `"all"` otherwise (the behaviour before
            streams, measured on independent episodes). The other states
            get neither the synthetic nor the `bp_lambda` part.
        aux: bool, DNI + Aux (see above): each border's state also predicts
            the synthetic gradient at the next border. Needs
            `synthetic_gradient=True`. Default `False`.
        aux_weight: non-negative float, the weight of the auxiliary loss
            (default 1).
        sg_prediction_clip: positive float or `None`: each example's
            synthetic gradient at a border (`M`'s prediction, also the one
            a stateful batch's last state receives and the auxiliary
            task's target) is scaled down where its norm exceeds this
            times the root mean square norm of `M`'s recent targets (see
            `keras_dni.SyntheticGradient`'s `prediction_clip`). Default
            1.0 (the feed-forward layers' default is 3.0): on character
            level language modelling, plain DNI without it got worse after
            a few hundred steps in about half the runs and ended 0.27-0.44
            bits per character behind truncated BPTT; with 1.0 it stays
            stable (docs/recurrent.md). `None`: no bound (the behaviour
            before 2026-11-28).
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: a tensor `(batch_size, timesteps, features)` with a static
            number of time steps (the chunks are a Python loop, unrolled
            when the layer is traced).
        training: bool, whether the call is part of a training step.

    Input shape:
        `(batch_size, timesteps, features)`.

    Output shape:
        `(batch_size, timesteps, units)` with `return_sequences=True`,
        `(batch_size, units)` otherwise (`units`: the cell's output size).

    Example:

    >>> import keras, keras_dni
    >>> model = keras_dni.DNISequential([
    ...     keras.Input((12, 4)),
    ...     keras_dni.DNIRNN(keras.layers.LSTMCell(16), truncation=3,
    ...                      return_sequences=True, name="rnn"),
    ...     keras.layers.Dense(2),
    ... ])
    >>> model.compile("adam", "mse")
    >>> history = model.fit(keras.random.normal((32, 12, 4)),
    ...                     keras.random.normal((32, 12, 2)), verbose=0)
    >>> "sg_loss_rnn" in history.history
    True
    """

    def __init__(
        self,
        cell,
        truncation,
        synthetic_gradient=True,
        return_sequences=False,
        stateful=False,
        sg_hidden_units=(),
        sg_input_normalization=None,
        bp_lambda=0.0,
        stream_discount=0.5,
        sg_states="auto",
        aux=False,
        aux_weight=1.0,
        sg_prediction_clip=RECURRENT_PREDICTION_CLIP,
        **kwargs,
    ):
        if isinstance(cell, (list, tuple)):
            cell = keras.layers.StackedRNNCells(cell)
        if not isinstance(cell, keras.layers.Layer) or not hasattr(cell, "state_size"):
            raise TypeError(
                "Received an invalid value for `cell`, expected a Keras RNN "
                "cell instance (a layer with `call(inputs, states)` and a "
                "`state_size`, e.g. `keras.layers.LSTMCell(64)`). "
                f"Received: cell={cell!r}"
            )
        super().__init__(**kwargs)
        self.cell = cell
        self.truncation = _check_truncation(truncation)
        self.use_synthetic_gradient = validation.check_bool(
            "synthetic_gradient", synthetic_gradient
        )
        self.return_sequences = validation.check_bool(
            "return_sequences", return_sequences
        )
        self.stateful = validation.check_bool("stateful", stateful)
        sg_hidden_units = validation.check_hidden_units(
            "sg_hidden_units", sg_hidden_units
        )
        sg_input_normalization = validation.check_choice(
            "sg_input_normalization", sg_input_normalization, ("layer", None)
        )
        bp_lambda = validation.check_fraction("bp_lambda", bp_lambda)
        sg_prediction_clip = validation.check_positive(
            "sg_prediction_clip", sg_prediction_clip, optional=True
        )
        self.stream_discount = _check_stream_discount(stream_discount)
        self.sg_states = validation.check_choice(
            "sg_states", sg_states, ("auto", "all", "outputs")
        )
        self.aux = validation.check_bool("aux", aux)
        self.aux_weight = _check_aux_weight(aux_weight)
        if self.aux and not self.use_synthetic_gradient:
            raise ValueError(
                "Received an invalid value for `aux`: the auxiliary task "
                "predicts synthetic gradients, so `aux=True` needs "
                "`synthetic_gradient=True`. Received: aux=True, "
                "synthetic_gradient=False"
            )
        # Kept for `get_config` when there is no gradient model.
        self._sg_config = {
            "sg_hidden_units": sg_hidden_units,
            "sg_input_normalization": sg_input_normalization,
            "bp_lambda": bp_lambda,
            "sg_prediction_clip": sg_prediction_clip,
        }
        if self.use_synthetic_gradient:
            self.synthetic_gradient = SyntheticGradient(
                hidden_units=sg_hidden_units,
                input_normalization=sg_input_normalization,
                bp_lambda=bp_lambda,
                # The recurrent M is trained by `sg_optimizer` (also at the
                # end of a stateful batch, outside `SyntheticGradient.call`).
                solver="gradient",
                prediction_clip=sg_prediction_clip,
                name="synthetic_gradient",
            )
            self.synthetic_gradient.metric_prefix_name = self.name
        else:
            self.synthetic_gradient = None
        # DNI + Aux: a linear head on the state at each border that predicts
        # the synthetic gradient at the next border (trained with the net).
        self.aux_head = None
        if self.aux:
            self.aux_head = keras.layers.Dense(
                sum(int(s) for s in tf.nest.flatten(cell.state_size)),
                kernel_initializer="zeros",
                name="aux_head",
            )
        self._state_sizes = [int(s) for s in tf.nest.flatten(cell.state_size)]
        # Which flattened states are a cell's output (the first state of
        # each cell: `h` of an LSTM, the whole state of a GRU).
        self._output_states = []
        for sub_cell in getattr(cell, "cells", [cell]):
            count = len(tf.nest.flatten(sub_cell.state_size))
            self._output_states += [True] + [False] * (count - 1)
        if len(self._output_states) != len(self._state_sizes):
            self._output_states = [True] * len(self._state_sizes)
        self.states = None

    # ------------------------------------------------------------------ build
    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                "`DNIRNN` expects inputs of shape (batch_size, timesteps, "
                f"features). Received: input_shape={input_shape}"
            )
        batch, features = input_shape[0], input_shape[-1]
        if not self.cell.built:
            self.cell.build((batch, features))
        if self.synthetic_gradient is not None:
            self.synthetic_gradient.build((batch, sum(self._state_sizes)))
        if self.aux_head is not None and not self.aux_head.built:
            self.aux_head.build((batch, sum(self._state_sizes)))
        if self.stateful:
            if batch is None:
                raise ValueError(
                    f"`DNIRNN` '{self.name}' with `stateful=True` needs a "
                    "static batch size: pass `batch_size` to `keras.Input` "
                    "(or `batch_shape`). Received: "
                    f"input_shape={input_shape}"
                )
            self.states = [
                self.add_weight(
                    shape=(batch, size),
                    initializer="zeros",
                    trainable=False,
                    name=f"state_{i}",
                )
                for i, size in enumerate(self._state_sizes)
            ]

    def reset_state(self):
        """Zeroes the carried state of a stateful layer."""
        if self.states is not None:
            for state in self.states:
                state.assign(tf.zeros_like(state))

    # ------------------------------------------------------------------ state
    def _initial_state(self, batch):
        if self.stateful:
            return [tf.cast(s, self.cell.compute_dtype) for s in self.states]
        get_initial_state = getattr(self.cell, "get_initial_state", None)
        if get_initial_state is not None:
            return tf.nest.flatten(get_initial_state(batch_size=batch))
        return [
            tf.zeros((batch, size), dtype=self.cell.compute_dtype)
            for size in self._state_sizes
        ]

    def _pack(self, flat_states):
        structure = self.cell.state_size
        if isinstance(structure, numbers.Integral):
            return list(flat_states)
        return tf.nest.pack_sequence_as(structure, list(flat_states))

    def _injected_states(self):
        """Per flattened state: whether it receives the synthetic gradient."""
        mode = self.sg_states
        if mode == "auto":
            mode = "outputs" if self.stateful else "all"
        if mode == "all":
            return [True] * len(self._state_sizes)
        return list(self._output_states)

    def _mask_states(self, flat_states):
        """States that get no synthetic gradient pass as `stop_gradient`."""
        return [
            s if inject else tf.stop_gradient(s)
            for s, inject in zip(flat_states, self._injected_states())
        ]

    def _through_synthetic_gradient(self, flat_states):
        """The border: identity forward, `M(s)` backward (SyntheticGradient)."""
        joined = tf.concat(self._mask_states(flat_states), axis=-1)
        joined = self.synthetic_gradient(joined, training=True)
        return list(tf.split(joined, self._state_sizes, axis=-1))

    def _reset_dropout_masks(self):
        cells = getattr(self.cell, "cells", [self.cell])
        for cell in cells:
            for name in ("reset_dropout_mask", "reset_recurrent_dropout_mask"):
                method = getattr(cell, name, None)
                if method is not None:
                    method()

    # ------------------------------------------------------------------- call
    def call(self, inputs, training=None):
        timesteps = inputs.shape[1]
        if timesteps is None:
            raise ValueError(
                f"`DNIRNN` '{self.name}' needs a static number of time steps "
                "(it unrolls the chunks when traced). Give `keras.Input` a "
                "shape such as `(timesteps, features)`. Received: "
                f"inputs.shape={inputs.shape}"
            )
        batch = tf.shape(inputs)[0]
        ctx = context.current()
        decoupled = bool(training) and self.synthetic_gradient is not None
        force_backprop = ctx is not None and ctx.force_backprop
        states = self._initial_state(batch)
        if decoupled and self.stateful:
            # The state comes from the previous batch, whose last chunk was
            # trained with M(state): train M on the gradient that arrives.
            states = self._through_synthetic_gradient(states)
        self._reset_dropout_masks()
        outputs = []
        borders = []  # the state at the end of each chunk but the last
        for start in range(0, timesteps, self.truncation):
            if start > 0:
                if decoupled:
                    borders.append(tf.concat(states, axis=-1))
                    states = self._through_synthetic_gradient(states)
                else:
                    states = [tf.stop_gradient(s) for s in states]
            for t in range(start, min(start + self.truncation, timesteps)):
                output, new_states = self.cell(
                    inputs[:, t], self._pack(states), training=training
                )
                states = tf.nest.flatten(new_states)
                outputs.append(output)
        self._reset_dropout_masks()
        if decoupled and self.aux and not force_backprop and borders:
            outputs[-1] = self._aux_task(outputs[-1], borders, states, ctx)
        if decoupled and self.stateful and not force_backprop:
            outputs[-1] = self._inject_end(outputs[-1], states, ctx)
        if self.stateful and not force_backprop:
            # (The monitor's extra exact-backprop pass must not advance it.)
            for variable, state in zip(self.states, states):
                variable.assign(tf.cast(tf.stop_gradient(state), variable.dtype))
        if self.return_sequences:
            return tf.stack(outputs, axis=1)
        return outputs[-1]

    @staticmethod
    def _per_example_scale(joined, ctx):
        """Loss scale over the global batch size (gradient per example)."""
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        global_batch = tf.cast(tf.shape(joined)[0] * replicas, tf.float32)
        loss_scale = None if ctx is None else ctx.loss_scale
        scale = 1.0 if loss_scale is None else tf.cast(loss_scale, tf.float32)
        return scale / global_batch

    def _aux_task(self, last_output, borders, last_states, ctx):
        """DNI + Aux: the state at border k predicts `M` at border k + 1.

        The head's loss, `aux_weight` times the mean over the borders of the
        per-example mean squared error (mean over the batch), trains the
        head and, through the state at border k, the chunk before it.
        The target is `M`'s prediction at the next border, a constant; past
        the last chunk of a non-stateful sequence it is 0 (no future), past
        that of a stateful batch it is `M(last state)`.
        """
        sg = self.synthetic_gradient
        ends = borders[1:]
        if self.stateful:
            ends.append(tf.concat(last_states, axis=-1))
        targets = [sg.sent_gradient(tf.stop_gradient(s)) for s in ends]
        if not self.stateful:
            targets.append(tf.zeros(tf.shape(borders[-1]), tf.float32))
        scale = self.aux_weight / len(borders)
        scale = scale * self._per_example_scale(borders[0], ctx)
        for border, target in zip(borders, targets):
            prediction = self.aux_head(border)
            last_output = _attach_aux_gradient(
                last_output, prediction, tf.stop_gradient(target), scale
            )
        return last_output

    def _inject_end(self, last_output, states, ctx):
        joined = tf.concat(self._mask_states(states), axis=-1)
        sg = self.synthetic_gradient
        prediction = sg.sent_gradient(tf.stop_gradient(joined))
        weight = (1.0 - tf.convert_to_tensor(sg.bp_lambda)) * self.stream_discount
        output = _inject_future_gradient(
            last_output,
            joined,
            prediction,
            self._per_example_scale(joined, ctx),
            weight,
        )
        return output

    # ---------------------------------------------------------- shapes/config
    def compute_output_shape(self, input_shape):
        units = getattr(self.cell, "output_size", None)
        if not isinstance(units, numbers.Integral):
            units = self._state_sizes[0]
        if self.return_sequences:
            return (input_shape[0], input_shape[1], units)
        return (input_shape[0], units)

    def get_config(self):
        if self.synthetic_gradient is not None:
            sg = self.synthetic_gradient
            sg_config = {
                "sg_hidden_units": sg.hidden_units,
                "sg_input_normalization": sg.input_normalization,
                "bp_lambda": sg.initial_bp_lambda,
                "sg_prediction_clip": sg.prediction_clip,
            }
        else:
            sg_config = dict(self._sg_config)
        config = {
            "cell": keras.saving.serialize_keras_object(self.cell),
            "truncation": self.truncation,
            "synthetic_gradient": self.use_synthetic_gradient,
            "return_sequences": self.return_sequences,
            "stateful": self.stateful,
            "stream_discount": self.stream_discount,
            "sg_states": self.sg_states,
            "aux": self.aux,
            "aux_weight": self.aux_weight,
            **sg_config,
        }
        return {**super().get_config(), **config}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        cell = keras.saving.deserialize_keras_object(
            config.pop("cell"), custom_objects=custom_objects
        )
        return cls(cell, **config)
