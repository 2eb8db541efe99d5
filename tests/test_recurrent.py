"""DNIRNN (recurrent DNI) and the copy task: chunking, injection, targets."""

import inspect
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import layer_norm
from helpers import set_random_gradient_model

import keras_dni
from keras_dni.benchmarks import copy_task
from keras_dni.recurrent import DNIRNN

B, L, D_IN, UNITS = 4, 7, 3, 5


def _inputs(shape=(B, L, D_IN), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype("float32")


def _m_input(s, norm):
    """What the gradient model sees: the state, standardised or not."""
    return layer_norm(s) if norm == "layer" else np.asarray(s, np.float64)


def _prediction(s, kernel, bias, norm=None):
    """A linear gradient model by hand (numpy)."""
    return (_m_input(s, norm) @ kernel + bias).astype("float32")


def _lstm_step(x, h, c, kernel, recurrent_kernel, bias):
    """`keras.layers.LSTMCell`'s step, written out (gates i, f, c, o)."""
    z = x @ kernel + h @ recurrent_kernel + bias
    i, f, g, o = tf.split(z, 4, axis=-1)
    c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
    h = tf.sigmoid(o) * tf.tanh(c)
    return h, c


def _cell_weights(cell):
    return [tf.constant(w.numpy()) for w in (cell.kernel, cell.recurrent_kernel)] + [
        tf.constant(cell.bias.numpy())
    ]


def _hand_chunked_lstm(x, weights, truncation, r, m_kernel, m_bias, norm):
    """Chunked BPTT with the synthetic gradient M(s)/B at each inner border.

    Loss: `mean(outputs * r)`. Returns the gradients w.r.t. `x`, the cell
    weights and M's kernel/bias (the L2 regression gradient over borders).
    """
    batch, length, _ = x.shape
    units = weights[1].shape[0]
    x = tf.constant(x)
    denominator = float(batch * length * units)
    chunks = [(a, min(a + truncation, length)) for a in range(0, length, truncation)]
    h = tf.zeros((batch, units))
    c = tf.zeros((batch, units))
    starts = []
    for a, b in chunks:
        starts.append(tf.concat([h, c], -1).numpy())
        for t in range(a, b):
            h, c = _lstm_step(x[:, t], h, c, *weights)
    x_grad = np.zeros(x.shape, np.float32)
    w_grads = [np.zeros(w.shape, np.float32) for w in weights]
    targets = {}  # border k (after chunk k) -> per-example target
    for k, (a, b) in enumerate(chunks):
        s0 = tf.constant(starts[k])
        with tf.GradientTape() as tape:
            tape.watch([x, s0] + weights)
            h, c = s0[:, :units], s0[:, units:]
            loss = 0.0
            for t in range(a, b):
                h, c = _lstm_step(x[:, t], h, c, *weights)
                loss += tf.reduce_sum(h * r[:, t]) / denominator
            if k < len(chunks) - 1:
                end = tf.concat([h, c], -1)
                synthetic = _prediction(end.numpy(), m_kernel, m_bias, norm) / batch
                loss += tf.reduce_sum(end * synthetic)
        grads = tape.gradient(loss, [x, s0] + weights)
        x_grad += grads[0].numpy()
        for acc, g in zip(w_grads, grads[2:]):
            acc += g.numpy()
        if k > 0:
            targets[k - 1] = grads[1].numpy() * batch
    features = 2 * units
    exp_kernel = np.zeros(m_kernel.shape)
    exp_bias = np.zeros(m_bias.shape)
    for k, target in targets.items():
        pred = _prediction(starts[k + 1], m_kernel, m_bias, norm)
        d_pred = 2.0 * (pred - target) / (batch * features)
        exp_kernel += _m_input(starts[k + 1], norm).T @ d_pred
        exp_bias += d_pred.sum(0)
    return x_grad, w_grads, exp_kernel, exp_bias, targets, starts


def _layer_grads(layer, x, r):
    x = tf.constant(x)
    variables = [layer.cell.kernel, layer.cell.recurrent_kernel, layer.cell.bias]
    if layer.synthetic_gradient is not None:
        variables += layer.synthetic_gradient.trainable_variables
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x, training=True)
        loss = tf.reduce_mean(out * r)
    grads = tape.gradient(loss, [x] + variables)
    return out, grads


# ------------------------------------------------------------ equivalence
@pytest.mark.parametrize(
    "make_cell",
    [
        lambda: keras.layers.LSTMCell(UNITS),
        lambda: keras.layers.GRUCell(UNITS),
        lambda: keras.layers.SimpleRNNCell(UNITS),
    ],
)
@pytest.mark.parametrize("synthetic_gradient", [False, True])
def test_single_chunk_equals_keras_rnn(make_cell, synthetic_gradient):
    """T >= length: one chunk, no border; outputs and gradients = RNN(cell)."""
    x = tf.constant(_inputs())
    layer = DNIRNN(
        make_cell(),
        truncation=L,
        synthetic_gradient=synthetic_gradient,
        return_sequences=True,
    )
    reference = keras.layers.RNN(make_cell(), return_sequences=True)
    layer.build(x.shape)
    reference.build(x.shape)
    reference.set_weights(layer.cell.get_weights())
    r = tf.constant(_inputs((B, L, UNITS), seed=1))
    results = []
    for rnn in (layer, reference):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = rnn(x, training=True)
            loss = tf.reduce_sum(out * r)
        grads = tape.gradient(loss, [x] + rnn.cell.trainable_variables)
        results.append((out, grads))
    (out, grads), (ref_out, ref_grads) = results
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)
    last = DNIRNN(make_cell(), truncation=3, synthetic_gradient=synthetic_gradient)
    last.build(x.shape)
    reference.set_weights(last.cell.get_weights())
    # Chunking changes no value in the forward pass.
    np.testing.assert_allclose(
        last(x, training=True), reference(x)[:, -1], rtol=1e-5, atol=1e-6
    )


# -------------------------------------------------------------- truncation
@pytest.mark.parametrize("synthetic_gradient", [False, True])
def test_no_gradient_crosses_a_border_without_m(synthetic_gradient):
    """Loss on the last chunk only; M zero (as initialised) or absent."""
    x = tf.constant(_inputs())
    layer = DNIRNN(
        keras.layers.LSTMCell(UNITS),
        truncation=3,
        synthetic_gradient=synthetic_gradient,
        return_sequences=True,
    )
    for training in (True, False):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, training=training)
            loss = tf.reduce_sum(out[:, 6:])  # chunks: 0-2, 3-5, 6
        grad = tape.gradient(loss, x).numpy()
        np.testing.assert_array_equal(grad[:, :6], 0.0)
        assert np.abs(grad[:, 6]).min() > 0


@pytest.mark.parametrize("norm", [None, "layer"])
def test_gradients_match_hand_chunked_bptt_with_injection(norm):
    """Inputs, cell weights: in-chunk BPTT + M(s_border)/B at each border."""
    x = _inputs()
    r = _inputs((B, L, UNITS), seed=1)
    layer = DNIRNN(
        keras.layers.LSTMCell(UNITS),
        truncation=3,
        return_sequences=True,
        sg_input_normalization=norm,
    )
    layer.build(x.shape)
    m_kernel, m_bias = set_random_gradient_model(layer.synthetic_gradient)
    exp_x, exp_w, *_ = _hand_chunked_lstm(
        x, _cell_weights(layer.cell), 3, r, m_kernel, m_bias, norm
    )
    _, grads = _layer_grads(layer, x, r)
    np.testing.assert_allclose(grads[0], exp_x, rtol=1e-4, atol=1e-6)
    assert np.abs(exp_x[:, :3]).max() > 1e-3  # the injection reaches chunk 0
    for got, expected in zip(grads[1:4], exp_w):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm", [None, "layer"])
def test_gradient_model_target_is_the_bootstrapped_gradient(norm):
    """M regresses B * (next chunk's loss + next border's M) gradient."""
    x = _inputs()
    r = _inputs((B, L, UNITS), seed=1)
    layer = DNIRNN(
        keras.layers.LSTMCell(UNITS),
        truncation=3,
        return_sequences=True,
        sg_input_normalization=norm,
    )
    layer.build(x.shape)
    m_kernel, m_bias = set_random_gradient_model(layer.synthetic_gradient, seed=2)
    _, _, exp_kernel, exp_bias, targets, starts = _hand_chunked_lstm(
        x, _cell_weights(layer.cell), 3, r, m_kernel, m_bias, norm
    )
    assert sorted(targets) == [0, 1]
    _, grads = _layer_grads(layer, x, r)
    np.testing.assert_allclose(grads[4], exp_kernel, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads[5], exp_bias, rtol=1e-4, atol=1e-6)
    # The sg loss of the step: mean over the borders of the L2 error.
    tracker = layer.synthetic_gradient.sg_loss_tracker
    errors = [
        np.mean((_prediction(starts[k + 1], m_kernel, m_bias, norm) - t) ** 2)
        for k, t in targets.items()
    ]
    np.testing.assert_allclose(tracker.result(), np.mean(errors), rtol=1e-4)


def test_bp_lambda_one_is_full_bptt():
    x = tf.constant(_inputs())
    layer = DNIRNN(
        keras.layers.GRUCell(UNITS),
        truncation=2,
        bp_lambda=1.0,
        return_sequences=True,
    )
    reference = keras.layers.RNN(keras.layers.GRUCell(UNITS), return_sequences=True)
    layer.build(x.shape)
    reference.build(x.shape)
    reference.set_weights(layer.cell.get_weights())
    set_random_gradient_model(layer.synthetic_gradient)
    grads = []
    for rnn in (layer, reference):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(rnn(x, training=True)[:, -1])
        grads.append(tape.gradient(loss, x))
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------- stateful
def _rnn_step(x, h, kernel, recurrent_kernel, bias):
    return tf.tanh(x @ kernel + h @ recurrent_kernel + bias)


@pytest.mark.parametrize("discount", [1.0, 0.5])
def test_stateful_carries_state_and_synthetic_gradient_across_batches(discount):
    """The batch's end gets discount * M(s)/B; M's target is TD(discount)."""
    x1, x2 = _inputs((B, 3, D_IN), 0), _inputs((B, 3, D_IN), 1)
    r = _inputs((B, 3, UNITS), 2)
    layer = DNIRNN(
        keras.layers.SimpleRNNCell(UNITS),
        truncation=3,
        stateful=True,
        return_sequences=True,
        stream_discount=discount,
        # The unbounded reference; test_prediction_clip.py checks the clip.
        sg_prediction_clip=None,
    )
    layer.build((B, 3, D_IN))
    m_kernel, m_bias = set_random_gradient_model(layer.synthetic_gradient)
    weights = _cell_weights(layer.cell)
    m_vars = layer.synthetic_gradient.trainable_variables
    norm = float(B * 3 * UNITS)

    # Batch 1: the last state receives M(s)/B on top of its own gradient.
    xt = tf.constant(x1)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out1 = layer(xt, training=True)
        loss = tf.reduce_mean(out1 * r)
    got_x = tape.gradient(loss, xt)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        h = tf.zeros((B, UNITS))
        hand_loss = 0.0
        for t in range(3):
            h = _rnn_step(xt[:, t], h, *weights)
            hand_loss += tf.reduce_sum(h * r[:, t]) / norm
        end = h.numpy()
        synthetic = discount * _prediction(end, m_kernel, m_bias) / B
        hand_loss += tf.reduce_sum(h * synthetic)
    np.testing.assert_allclose(got_x, tape.gradient(hand_loss, xt), rtol=1e-4)
    np.testing.assert_allclose(layer.states[0], end, rtol=1e-6)

    # Batch 2 starts from that state; M regresses B * dL2/ds at its start,
    # where L2 includes the synthetic gradient at batch 2's end.
    with tf.GradientTape() as tape:
        out2 = layer(tf.constant(x2), training=True)
        loss2 = tf.reduce_mean(out2 * r)
    got_kernel, got_bias = tape.gradient(loss2, m_vars)
    s0 = tf.constant(end)
    with tf.GradientTape() as tape:
        tape.watch(s0)
        h, hand2 = s0, 0.0
        for t in range(3):
            h = _rnn_step(x2[:, t], h, *weights)
            hand2 += tf.reduce_sum(h * r[:, t]) / norm
        # Bootstrapped: batch 2's own end also receives discount * M(s)/B.
        synthetic = discount * _prediction(h.numpy(), m_kernel, m_bias) / B
        hand2 += tf.reduce_sum(h * synthetic)
    np.testing.assert_allclose(out2[:, -1], h, rtol=1e-5, atol=1e-6)
    target = tape.gradient(hand2, s0).numpy() * B
    d_pred = 2.0 * (_prediction(end, m_kernel, m_bias) - target) / (B * UNITS)
    np.testing.assert_allclose(
        got_kernel, _m_input(end, None).T @ d_pred, rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(got_bias, d_pred.sum(0), rtol=1e-4, atol=1e-6)
    layer.reset_state()
    np.testing.assert_array_equal(layer.states[0], 0.0)


# ------------------------------------------------------------------- models
def _sequential(**kwargs):
    return keras_dni.DNISequential(
        [
            keras.Input((6, D_IN)),
            DNIRNN(
                keras.layers.LSTMCell(UNITS),
                truncation=2,
                return_sequences=True,
                name="rnn",
                **kwargs,
            ),
            keras.layers.Dense(2),
        ]
    )


def test_dni_sequential_trains_m_with_its_sg_optimizer():
    x = _inputs((32, 6, D_IN))
    y = _inputs((32, 6, 2), seed=1)
    model = _sequential()
    model.compile("adam", "mse", sg_optimizer=keras.optimizers.SGD(0.1))
    rnn = model.get_layer("rnn")
    assert keras_dni.synthetic_gradient_layers(model) == [rnn.synthetic_gradient]
    _, sg_vars = model._dni_variables()
    assert [v.path for v in sg_vars] == [
        v.path for v in rnn.synthetic_gradient.trainable_variables
    ]
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert history.history["sg_loss_rnn"][-1] > 0
    assert np.abs(rnn.synthetic_gradient._input_dense.kernel.numpy()).max() > 0


def test_keras_round_trip(tmp_path):
    x = _inputs((16, 6, D_IN))
    y = _inputs((16, 6, 2), seed=1)
    model = _sequential(sg_hidden_units=(4,), sg_input_normalization="layer")
    model.compile("adam", "mse")
    model.fit(x, y, epochs=2, verbose=0)
    path = os.path.join(tmp_path, "rnn.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded(x))
    for a, b in zip(
        model.get_layer("rnn").synthetic_gradient.weights,
        loaded.get_layer("rnn").synthetic_gradient.weights,
    ):
        np.testing.assert_array_equal(a, b)
    config = loaded.get_layer("rnn").get_config()
    # (JSON: the cell's build config holds a tuple before and a list after.)
    assert json.dumps(config) == json.dumps(model.get_layer("rnn").get_config())
    assert config["sg_hidden_units"] == (4,)
    loaded.fit(x, y, epochs=1, verbose=0)


def test_get_config_has_every_constructor_argument():
    layer = DNIRNN(
        keras.layers.GRUCell(3),
        truncation=4,
        synthetic_gradient=False,
        return_sequences=True,
        stateful=True,
        sg_hidden_units=(8,),
        sg_input_normalization=None,
        bp_lambda=0.5,
        stream_discount=0.25,
        sg_states="all",
        aux_weight=2.0,
    )
    config = layer.get_config()
    params = set(inspect.signature(DNIRNN.__init__).parameters) - {"self", "kwargs"}
    assert params <= set(config)
    clone = DNIRNN.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.cell, keras.layers.GRUCell)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"cell": "lstm"}, TypeError, "`cell`.*Received: cell='lstm'"),
        ({"truncation": 0}, ValueError, "`truncation`.*Received: truncation=0"),
        ({"truncation": 2.5}, ValueError, "`truncation`.*truncation=2.5"),
        ({"synthetic_gradient": 1}, TypeError, "`synthetic_gradient`, expected a bool"),
        ({"stateful": "no"}, TypeError, "`stateful`"),
        ({"sg_hidden_units": (0,)}, ValueError, "`sg_hidden_units`"),
        ({"sg_input_normalization": "batch"}, ValueError, "`sg_input_normalization`"),
        ({"bp_lambda": 2.0}, ValueError, "`bp_lambda`"),
        (
            {"stream_discount": 1.5},
            ValueError,
            r"`stream_discount`, expected a float in \[0, 1\].*stream_discount=1.5",
        ),
        ({"stream_discount": True}, TypeError, "stream_discount=True"),
        ({"stream_discount": "0.5"}, TypeError, "stream_discount='0.5'"),
        ({"sg_states": "cell"}, ValueError, "`sg_states`.*sg_states='cell'"),
        ({"aux": 1}, TypeError, "`aux`, expected a bool"),
        ({"aux_weight": -1.0}, ValueError, "`aux_weight`.*aux_weight=-1.0"),
        ({"aux_weight": None}, TypeError, "aux_weight=None"),
        ({"sg_prediction_clip": 0.0}, ValueError, "sg_prediction_clip=0.0"),
        ({"sg_prediction_clip": "1"}, TypeError, "sg_prediction_clip='1'"),
        (
            {"aux": True, "synthetic_gradient": False},
            ValueError,
            "`aux`.*needs `synthetic_gradient=True`",
        ),
    ],
)
def test_constructor_errors(kwargs, error, match):
    arguments = {"cell": keras.layers.LSTMCell(2), "truncation": 2, **kwargs}
    with pytest.raises(error, match=match):
        DNIRNN(**arguments)


def test_shape_errors():
    layer = DNIRNN(keras.layers.LSTMCell(2), truncation=2, stateful=True)
    with pytest.raises(ValueError, match="static batch size"):
        layer.build((None, 5, 3))
    layer = DNIRNN(keras.layers.LSTMCell(2), truncation=2)

    @tf.function(input_signature=[tf.TensorSpec((None, None, 3))])
    def call(x):
        return layer(x, training=True)

    with pytest.raises(ValueError, match="static number of time steps"):
        call.get_concrete_function()


# ---------------------------------------------------------------- copy task
def test_copy_task_batch_shapes_and_labels():
    x, y, weights = copy_task.copy_task_batch(3, 5, rng=0)
    assert x.shape == (5, 7, 9) and y.shape == (5, 7, 8)
    assert weights.shape == (5, 7)
    assert x.dtype == y.dtype == weights.dtype == np.float32
    assert set(np.unique(x)) <= {0.0, 1.0}
    np.testing.assert_array_equal(y[:, 4:], x[:, :3, :8])  # the copy
    np.testing.assert_array_equal(y[:, :4], 0.0)
    np.testing.assert_array_equal(x[:, 3:, :8], 0.0)  # no bits after input
    np.testing.assert_array_equal(x[:, :, 8], np.eye(7)[3][None].repeat(5, 0))
    np.testing.assert_array_equal(weights, np.tile([0, 0, 0, 0, 1, 1, 1], (5, 1)))
    again = copy_task.copy_task_batch(3, 5, rng=0)
    np.testing.assert_array_equal(again[0], x)
    other = copy_task.copy_task_batch(3, 5, rng=1)
    assert not np.array_equal(other[0], x)


def test_bits_per_step_against_numpy():
    x, y, weights = copy_task.copy_task_batch(2, 3, rng=0)
    logits = np.random.default_rng(1).normal(size=y.shape).astype("float32")
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    bits = -(y * np.log2(p) + (1 - y) * np.log2(1 - p)).sum(-1)
    expected = bits[:, 3:].mean()
    got = copy_task.bits_per_step(y, logits, weights)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_run_copy_task_smoke():
    result = copy_task.run_copy_task(
        truncation=2, synthetic_gradient=True, steps=4, seed=0, units=4, window=2
    )
    assert set(result) >= {"max_length", "steps", "seconds", "history"}
    assert result["steps"] == 4 and result["max_length"] == 0


def test_run_copy_task_curriculum_starts_at_start_length():
    # Any error is below this threshold: every window solves the current N.
    result = copy_task.run_copy_task(
        truncation=2,
        synthetic_gradient=False,
        steps=6,
        seed=0,
        units=4,
        window=2,
        threshold=1e9,
        start_length=3,
        max_length=4,
    )
    assert result["history"] == [(2, 3), (4, 4)]
    assert result["max_length"] == 4


def test_first_truncated_length():
    # 2N + 1 time steps: the first N whose sequence is longer than T.
    for t in range(1, 20):
        n = copy_task.first_truncated_length(t)
        assert 2 * n + 1 > t >= 2 * (n - 1) + 1
    with pytest.raises(ValueError, match="`truncation`"):
        copy_task.first_truncated_length(0)


def test_run_copy_task_auto_start_length():
    result = copy_task.run_copy_task(
        truncation=5,
        synthetic_gradient=False,
        steps=2,
        seed=0,
        units=4,
        window=2,
        threshold=1e9,
        start_length="auto",
    )
    assert result["start_length"] == 3
    assert result["history"] == [(2, 3)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"start_length": 0}, "`start_length`.*start_length=0"),
        ({"start_length": 5, "max_length": 4}, "`start_length`.*at most"),
        ({"start_length": "first"}, "`start_length`.*'auto'.*'first'"),
        (
            {"start_length": "auto", "truncation": 9, "max_length": 4},
            r"at most `max_length` \(4\).*'auto' \(N=5 for truncation=9\)",
        ),
    ],
)
def test_run_copy_task_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        copy_task.run_copy_task(
            **{"truncation": 2, "synthetic_gradient": False, "steps": 1, "seed": 0}
            | kwargs
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"length": 0, "batch_size": 2, "rng": 0}, "`length`.*length=0"),
        ({"length": 2, "batch_size": -1, "rng": 0}, "`batch_size`"),
    ],
)
def test_copy_task_batch_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        copy_task.copy_task_batch(**kwargs)
