"""`DNIRNN`: truncated BPTT with synthetic gradients at the truncation points."""

import numbers

import keras
import tensorflow as tf

from keras_dni import context
from keras_dni import validation
from keras_dni.synthetic_gradient import SyntheticGradient


def _check_truncation(value):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            "Received an invalid value for `truncation`, expected a positive "
            "integer (the number of time steps per truncated-BPTT chunk). "
            f"Received: truncation={value!r}"
        )
    return int(value)


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
            above). On an endless stream `M`'s target is the gradient of
            the loss of the whole future stream, with nothing to end the
            bootstrapping: watch `sg_loss_<name>`. On the copy task as one
            continuous stream (one `truncation`-step chunk per batch) we
            measured `M`'s predictions growing without bound once the
            network trained on them; with the network frozen, `M`
            converged.
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
        # Kept for `get_config` when there is no gradient model.
        self._sg_config = {
            "sg_hidden_units": sg_hidden_units,
            "sg_input_normalization": sg_input_normalization,
            "bp_lambda": bp_lambda,
        }
        if self.use_synthetic_gradient:
            self.synthetic_gradient = SyntheticGradient(
                hidden_units=sg_hidden_units,
                input_normalization=sg_input_normalization,
                bp_lambda=bp_lambda,
                # The recurrent M is trained by `sg_optimizer` (also at the
                # end of a stateful batch, outside `SyntheticGradient.call`).
                solver="gradient",
                name="synthetic_gradient",
            )
            self.synthetic_gradient.metric_prefix_name = self.name
        else:
            self.synthetic_gradient = None
        self._state_sizes = [int(s) for s in tf.nest.flatten(cell.state_size)]
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

    def _through_synthetic_gradient(self, flat_states):
        """The border: identity forward, `M(s)` backward (SyntheticGradient)."""
        joined = tf.concat(flat_states, axis=-1)
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
        for start in range(0, timesteps, self.truncation):
            if start > 0:
                if decoupled:
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
        if decoupled and self.stateful and not force_backprop:
            outputs[-1] = self._inject_end(outputs[-1], states, ctx)
        if self.stateful and not force_backprop:
            # (The monitor's extra exact-backprop pass must not advance it.)
            for variable, state in zip(self.states, states):
                variable.assign(tf.cast(tf.stop_gradient(state), variable.dtype))
        if self.return_sequences:
            return tf.stack(outputs, axis=1)
        return outputs[-1]

    def _inject_end(self, last_output, states, ctx):
        joined = tf.concat(states, axis=-1)
        sg = self.synthetic_gradient
        prediction = sg.predict_gradient(tf.stop_gradient(joined))
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        global_batch = tf.cast(tf.shape(joined)[0] * replicas, tf.float32)
        loss_scale = None if ctx is None else ctx.loss_scale
        scale = 1.0 if loss_scale is None else tf.cast(loss_scale, tf.float32)
        weight = 1.0 - tf.convert_to_tensor(sg.bp_lambda)
        output = _inject_future_gradient(
            last_output, joined, prediction, scale / global_batch, weight
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
            }
        else:
            sg_config = dict(self._sg_config)
        config = {
            "cell": keras.saving.serialize_keras_object(self.cell),
            "truncation": self.truncation,
            "synthetic_gradient": self.use_synthetic_gradient,
            "return_sequences": self.return_sequences,
            "stateful": self.stateful,
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
