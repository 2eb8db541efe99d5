"""`prediction_clip`: the bound on the synthetic gradient sent below.

Checked against numpy: the clipped prediction, the running norm of the
targets it is measured against (both solvers), a skipped non-finite batch,
the config and argument errors, and weights files saved before the running
norm existed.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import SnapshotRecorder
from helpers import assert_argument_rejected
from helpers import assert_sgd_update
from helpers import check_loads_without
from helpers import one_dni_layer_model
from helpers import sent_below
from helpers import set_linear_gradient_model
from helpers import small_dni_model

import keras_dni
from keras_dni.synthetic_gradient import PREDICTION_CLIP

BATCH, WIDTH = 6, 5


def _layer(clip=PREDICTION_CLIP, solver="least_squares", shape=(None, WIDTH), **kw):
    sg = keras_dni.SyntheticGradient(
        solver=solver, input_normalization=None, prediction_clip=clip, **kw
    )
    sg.build(shape)
    return sg


def _mean_square(targets):
    """Mean over rows of the squared norm of each row (the last axis)."""
    rows = np.reshape(targets, (-1, targets.shape[-1]))
    return float(np.mean(np.sum(np.square(rows), axis=1)))


@pytest.mark.parametrize("clip", [0.5, 3.0, None])
def test_sent_gradient_is_the_clipped_prediction(clip):
    rng = np.random.default_rng(0)
    sg = _layer(clip)
    kernel, bias = set_linear_gradient_model(sg, rng, bias_scale=0.01)
    mean_square = 2.0
    sg._target_norm.mean_square.assign(mean_square)
    # Rows of very different sizes, so that some are clipped and some not.
    scales = np.array([[0.01], [0.1], [1.0], [3.0], [10.0], [0.3]], "float32")
    h = rng.normal(size=(BATCH, WIDTH)).astype("float32") * scales
    prediction = h @ kernel + bias
    expected = prediction
    if clip is not None:
        norms = np.linalg.norm(prediction, axis=1, keepdims=True)
        factor = np.minimum(1.0, clip * np.sqrt(mean_square) / norms)
        assert (factor < 1.0).any() and (factor == 1.0).any()
        expected = prediction * factor
    # Without a training context the gradient sent is prediction / batch.
    sent = sent_below(sg, h) * BATCH
    np.testing.assert_allclose(sent, expected, rtol=1e-5, atol=1e-6)


def test_no_clip_before_the_first_target():
    rng = np.random.default_rng(1)
    sg = _layer(1e-6)
    kernel, bias = set_linear_gradient_model(sg, rng)
    h = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    np.testing.assert_allclose(
        sent_below(sg, h) * BATCH, h @ kernel + bias, rtol=1e-5, atol=1e-6
    )


def test_clip_is_per_position_over_channels_first_channels():
    rng = np.random.default_rng(2)
    channels = 3
    sg = _layer(0.7, shape=(None, channels, 2, 2), data_format="channels_first")
    kernel, bias = set_linear_gradient_model(sg, rng)
    mean_square = 0.5
    sg._target_norm.mean_square.assign(mean_square)
    h = rng.normal(size=(2, channels, 2, 2)).astype("float32")
    h[0, :, 0, 0] *= 0.01  # one position well inside the bound
    prediction = np.einsum("bchw,cd->bdhw", h, kernel[0, 0]) + bias[None, :, None, None]
    norms = np.linalg.norm(prediction, axis=1, keepdims=True)
    expected = prediction * np.minimum(1.0, 0.7 * np.sqrt(mean_square) / norms)
    np.testing.assert_allclose(sent_below(sg, h) * 2, expected, rtol=1e-5, atol=1e-6)


def test_target_norm_follows_the_least_squares_window():
    rng = np.random.default_rng(3)
    sg = _layer(solver_decay=0.75)
    h = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    features = sg.least_squares_features(h)
    expected = None
    for scale in (1.0, 3.0, 0.5):
        target = (rng.normal(size=(BATCH, WIDTH)) * scale).astype("float32")
        sg.fit_least_squares(features, target, 1.0)
        batch = _mean_square(target)
        # The first batch sets it; then the solver's decay.
        expected = batch if expected is None else 0.75 * expected + 0.25 * batch
        np.testing.assert_allclose(
            sg._target_norm.mean_square.numpy(), expected, rtol=1e-5
        )


def test_skipped_non_finite_batch_changes_nothing():
    rng = np.random.default_rng(4)
    sg = _layer(solver_decay=0.5)
    h = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    features = sg.least_squares_features(h)
    sg.fit_least_squares(features, rng.normal(size=(BATCH, WIDTH)), 1.0)
    before = [v.numpy().copy() for v in sg.weights]
    bad = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    bad[0, 0] = np.inf
    bad[1, 2] = np.nan
    sg.fit_least_squares(features, bad, 0.0)
    for old, variable in zip(before, sg.weights):
        np.testing.assert_array_equal(variable.numpy(), old, err_msg=variable.path)


def test_gradient_solver_tracks_its_targets():
    rng = np.random.default_rng(5)
    sg = _layer(solver="gradient")
    h = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    expected = None
    for _ in range(2):
        upstream = rng.normal(size=(BATCH, WIDTH)).astype("float32")
        sent_below(sg, h, upstream)
        # The per-example target is the incoming gradient times the batch.
        batch = _mean_square(upstream * BATCH)
        # `solver_decay="auto"`'s window: 1 - rows / (2 * (WIDTH + 1)).
        decay = 1.0 - BATCH / (2.0 * (WIDTH + 1))
        expected = batch if expected is None else decay * expected + (1 - decay) * batch
        np.testing.assert_allclose(
            sg._target_norm.mean_square.numpy(), expected, rtol=1e-5
        )


def _two_dni_layers(rows, seed, solver, schedule, activation, **compile_kwargs):
    """Input(4) -> DNIDense "a", "b" (8 units) -> Dense(3) logits, compiled
    after `set_random_seed(seed)`; with `rows` random examples `x, y`."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4)).astype("float32")
    y = rng.integers(0, 3, size=rows)
    keras.utils.set_random_seed(seed)
    model = keras_dni.DNISequential(
        [
            keras.Input((4,)),
            keras_dni.DNIDense(8, activation=activation, sg_solver=solver, name="a"),
            keras_dni.DNIDense(8, activation=activation, sg_solver=solver, name="b"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        "adam",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        schedule=schedule,
        **compile_kwargs,
    )
    return model, x, y


@pytest.mark.parametrize("schedule", ["locked", "unlocked", "pipelined"])
@pytest.mark.parametrize("solver", ["least_squares", "gradient"])
def test_every_schedule_tracks_the_targets(schedule, solver):
    model, x, y = _two_dni_layers(32, 6, solver, schedule, "relu")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for name in ("a", "b"):
        value = model.get_layer(name).synthetic_gradient._target_norm.mean_square
        assert np.isfinite(value.numpy()) and value.numpy() > 0.0


def _m_kernels_and_norms(model):
    """Per decoupling point "a", "b": M's kernel and its targets' norm."""
    snapshot = {}
    for name in ("a", "b"):
        sg = model.get_layer(name).synthetic_gradient
        snapshot[name] = (
            sg._input_dense.kernel.numpy().copy(),
            float(sg._target_norm.mean_square.numpy()),
        )
    return snapshot


@pytest.mark.parametrize("schedule", ["locked", "unlocked", "pipelined"])
@pytest.mark.parametrize("solver", ["least_squares", "gradient"])
def test_a_stage_that_skips_its_update_keeps_its_target_norm(schedule, solver):
    # The running norm belongs to M: under `update_probability` it moves in
    # exactly the steps in which M does (refitted or trained), whatever the
    # solver and the schedule.
    model, x, y = _two_dni_layers(
        96, 12, solver, schedule, "tanh", update_probability=0.5
    )
    recorder = SnapshotRecorder(_m_kernels_and_norms)
    model.fit(
        x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[recorder]
    )
    moved = []
    for before, after in zip(recorder.snapshots[:-1], recorder.snapshots[1:]):
        for name in ("a", "b"):
            kernel_moved = not np.array_equal(before[name][0], after[name][0])
            norm_moved = before[name][1] != after[name][1]
            assert kernel_moved == norm_moved, (name, len(moved))
            moved.append(kernel_moved)
    assert any(moved) and not all(moved)


def test_config_round_trip():
    layer = keras_dni.DNIDense(4, sg_prediction_clip=1.5)
    config = layer.get_config()
    assert config["sg_prediction_clip"] == 1.5
    again = keras_dni.DNIDense.from_config(config)
    assert again.synthetic_gradient.prediction_clip == 1.5
    config["sg_prediction_clip"] = None
    off = keras_dni.DNIDense.from_config(config)
    assert off.synthetic_gradient.prediction_clip is None
    # A config saved before `prediction_clip` existed gets the default.
    del config["sg_prediction_clip"]
    old = keras_dni.DNIDense.from_config(config)
    assert old.synthetic_gradient.prediction_clip == PREDICTION_CLIP
    conv = keras_dni.DNIConv2D(2, 3, sg_prediction_clip=None)
    restored = keras_dni.DNIConv2D.from_config(conv.get_config())
    assert restored.synthetic_gradient.prediction_clip is None
    sg = keras_dni.SyntheticGradient(prediction_clip=2)
    assert keras_dni.SyntheticGradient.from_config(sg.get_config()).prediction_clip == 2
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)]
    )
    converted = keras_dni.apply_dni(model, sg_prediction_clip=0.5)
    assert converted.layers[0].synthetic_gradient.prediction_clip == 0.5


@pytest.mark.parametrize(
    "value, error",
    [
        (0.0, ValueError),
        (-1, ValueError),
        (float("inf"), ValueError),
        ("big", TypeError),
        (True, TypeError),
    ],
)
def test_argument_errors(value, error):
    assert_argument_rejected("prediction_clip", value, error)


def test_weights_saved_without_the_target_norm_still_load(tmp_path):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    model = small_dni_model()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    # As a file written before `prediction_clip` existed: no target norm.
    path = str(tmp_path / "model.weights.h5")
    check_loads_without(model, small_dni_model, path, "target_norm")


@pytest.mark.parametrize("schedule", ["locked", "unlocked", "pipelined"])
def test_every_schedule_updates_from_the_clipped_prediction(schedule):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(BATCH, 4)).astype("float32")
    y = rng.normal(size=(BATCH, 2)).astype("float32")
    keras.utils.set_random_seed(0)
    learning_rate = 0.1
    model = one_dni_layer_model(schedule, learning_rate, WIDTH, sg_prediction_clip=0.5)
    layer = model.get_layer("d")
    kernel, bias = set_linear_gradient_model(layer.synthetic_gradient, rng)
    layer.synthetic_gradient._target_norm.mean_square.assign(1.0)
    w0, b0 = layer.kernel.numpy().copy(), layer.bias.numpy().copy()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    # The first stage updates at once from the clipped M(h), by hand:
    prediction = (x @ w0 + b0) @ kernel + bias
    norms = np.linalg.norm(prediction, axis=1, keepdims=True)
    clipped = prediction * np.minimum(1.0, 0.5 / norms)
    assert (norms > 0.5).any()
    assert_sgd_update(layer, w0, b0, x, clipped, learning_rate)


def test_sent_gradient_is_what_a_step_sends():
    rng = np.random.default_rng(9)
    sg = _layer(0.8)
    set_linear_gradient_model(sg, rng)
    sg._target_norm.mean_square.assign(1.5)
    h = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    sent = sg.sent_gradient(h).numpy()
    unclipped = sg.predict_gradient(h).numpy()
    assert (np.linalg.norm(sent, axis=1) < np.linalg.norm(unclipped, axis=1)).any()
    # (The step then refits M, after using it.)
    np.testing.assert_allclose(sent_below(sg, h) * BATCH, sent, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ DNIRNN
def _clip_rows(prediction, mean_square, clip):
    """numpy: each row scaled down to at most `clip * sqrt(mean_square)`."""
    norm = np.linalg.norm(prediction, axis=-1, keepdims=True)
    limit = clip * np.sqrt(mean_square)
    return prediction * np.minimum(1.0, limit / np.maximum(norm, 1e-30))


def _rnn_states(x, kernel, recurrent_kernel, bias):
    """`keras.layers.SimpleRNNCell` (tanh) unrolled in numpy, from zeros."""
    h = np.zeros((x.shape[0], recurrent_kernel.shape[0]))
    states = []
    for t in range(x.shape[1]):
        h = np.tanh(x[:, t] @ kernel + h @ recurrent_kernel + bias)
        states.append(h)
    return states


@pytest.mark.parametrize("stateful", [False, True])
def test_dnirnn_sends_the_clipped_prediction(stateful):
    """Inner border: clip(M(s))/B; a stream's last state: gamma clip(M(s))/B."""
    batch, length, features, units, clip, gamma = 4, 4, 3, 5, 0.7, 0.5
    rng = np.random.default_rng(3)
    x = rng.normal(size=(batch, length, features)).astype("float32")
    r = rng.normal(size=(batch, length, units)).astype("float32")
    layer = keras_dni.DNIRNN(
        keras.layers.SimpleRNNCell(units),
        truncation=2,
        return_sequences=True,
        stateful=stateful,
        stream_discount=gamma,
        sg_prediction_clip=clip,
    )
    layer.build((batch, length, features))
    sg = layer.synthetic_gradient
    assert sg.prediction_clip == clip
    dense = sg._input_dense
    m_kernel = rng.normal(size=dense.kernel.shape).astype("float32")
    m_bias = rng.normal(size=dense.bias.shape).astype("float32")
    dense.kernel.assign(m_kernel)
    dense.bias.assign(m_bias)
    weights = [w.numpy() for w in (layer.cell.kernel, layer.cell.recurrent_kernel)]
    weights.append(layer.cell.bias.numpy())
    states = _rnn_states(x.astype("float64"), *weights)
    border, end = states[1], states[3]
    predictions = [s @ m_kernel + m_bias for s in (border, end)]
    # The bound between the border's rows' norms: two are clipped, two not.
    norms = np.linalg.norm(predictions[0], axis=-1)
    mean_square = float(np.median(norms) / clip) ** 2
    sg.record_targets(np.full((batch, units), np.sqrt(mean_square / units)))
    np.testing.assert_allclose(sg._target_norm.mean_square, mean_square, rtol=1e-5)

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_mean(layer(xt, training=True) * r)
    got = tape.gradient(loss, xt).numpy()

    sent = [_clip_rows(p, mean_square, clip) / batch for p in predictions]
    change = np.abs(sent[0] * batch - predictions[0]).max(-1)
    assert (change > 1e-3).sum() == 2 and (change < 1e-9).sum() == 2
    kernel, recurrent_kernel, bias = (tf.constant(w, tf.float64) for w in weights)
    x64 = tf.constant(x.astype("float64"))
    with tf.GradientTape() as tape:
        tape.watch(x64)
        h = tf.zeros((batch, units), tf.float64)
        hand = 0.0
        for t in range(length):
            if t == 2:  # the border: M's clipped prediction, no true gradient
                hand += tf.reduce_sum(h * sent[0])
                h = tf.stop_gradient(h)
            h = tf.tanh(x64[:, t] @ kernel + h @ recurrent_kernel + bias)
            hand += tf.reduce_sum(h * r[:, t]) / (batch * length * units)
        if stateful:
            hand += tf.reduce_sum(h * gamma * sent[1])
    np.testing.assert_allclose(got, tape.gradient(hand, x64), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("schedule", ["locked", "unlocked", "pipelined"])
def test_every_schedule_trains_m_on_the_clipped_prediction(schedule):
    # M (gradient solver, SGD) regresses the prediction it sent, after the
    # clip: its step is that of mean((s - t)^2) w.r.t. M's weights, with
    # s = p * f, f = min(1, clip * rms / |p|) held fixed, by hand. Under
    # "pipelined" the first refit comes in the second step, on the first
    # batch's h and with the weights of the start (nothing above the first
    # stage has moved yet).
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2 * BATCH, 4)).astype("float32")
    y = rng.normal(size=(2 * BATCH, 2)).astype("float32")
    keras.utils.set_random_seed(0)
    sg_lr = 0.05
    model = one_dni_layer_model(
        schedule,
        0.1,
        WIDTH,
        sg_optimizer=keras.optimizers.SGD(sg_lr),
        sg_prediction_clip=0.5,
    )
    layer, top = model.get_layer("d"), model.get_layer("top")
    kernel, bias = set_linear_gradient_model(layer.synthetic_gradient, rng)
    layer.synthetic_gradient._target_norm.mean_square.assign(36.0)
    w0, b0 = layer.kernel.numpy().copy(), layer.bias.numpy().copy()
    wt, bt = top.kernel.numpy().copy(), top.bias.numpy().copy()
    steps = 2 if schedule == "pipelined" else 1
    model.fit(
        x[: steps * BATCH],
        y[: steps * BATCH],
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
    )
    xb, yb = x[:BATCH].astype("float64"), y[:BATCH].astype("float64")
    h = xb @ w0 + b0
    prediction = h @ kernel + bias
    norms = np.linalg.norm(prediction, axis=1, keepdims=True)
    factor = np.minimum(1.0, 0.5 * 6.0 / norms)
    assert (factor < 1.0).any() and (factor == 1.0).any()
    sent = prediction * factor
    # The per-example gradient of the MSE at h (times the batch size).
    target = (h @ wt + bt - yb) @ wt.T
    d_sent = 2.0 * (sent - target) / sent.size
    d_prediction = d_sent * factor
    m = layer.synthetic_gradient._input_dense
    np.testing.assert_allclose(
        m.kernel.numpy(), kernel - sg_lr * h.T @ d_prediction, rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        m.bias.numpy(), bias - sg_lr * d_prediction.sum(0), rtol=1e-4, atol=1e-6
    )
