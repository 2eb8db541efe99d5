"""Issue 16: stateful streams, DNI + Aux, repeat copy and character LM."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import set_random_gradient_model

from keras_dni.benchmarks import charlm
from keras_dni.benchmarks import streams
from keras_dni.recurrent import DNIRNN
from keras_dni.recurrent import RECURRENT_PREDICTION_CLIP

B, L, D_IN, UNITS = 4, 7, 3, 5


def _inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _lstm_step(x, h, c, kernel, recurrent_kernel, bias):
    """`keras.layers.LSTMCell`'s step, written out (gates i, f, c, o)."""
    z = x @ kernel + h @ recurrent_kernel + bias
    i, f, g, o = tf.split(z, 4, axis=-1)
    c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
    h = tf.sigmoid(o) * tf.tanh(c)
    return h, c


def _cell_weights(cell):
    return [
        tf.constant(w.numpy()) for w in (cell.kernel, cell.recurrent_kernel, cell.bias)
    ]


def _m(s, kernel, bias):
    return (np.asarray(s, np.float64) @ kernel + bias).astype("float32")


# ------------------------------------------------------------- DNI + Aux
def _hand_aux(x, weights, truncation, r, m_kernel, m_bias, a_kernel, a_bias, w):
    """Chunked BPTT + M(s)/B at the borders + the auxiliary loss, by hand.

    Border k (the end of chunk k, k < last) gets the auxiliary loss
    `w / n_borders / B * sum_examples mean_features (A(s_k) - target_k)^2`
    with `target_k = M(s_{k+1})` (a constant), 0 past the last border.
    Returns the gradients of x, the cell weights, A's kernel and bias, and
    M's kernel and bias (its L2 regression on the arriving gradient).
    """
    batch, length, _ = x.shape
    units = weights[1].shape[0]
    x = tf.constant(x)
    denominator = float(batch * length * units)
    chunks = [(a, min(a + truncation, length)) for a in range(0, length, truncation)]
    n = len(chunks) - 1
    h = tf.zeros((batch, units))
    c = tf.zeros((batch, units))
    starts, ends = [], []
    for a, b in chunks:
        starts.append(tf.concat([h, c], -1).numpy())
        for t in range(a, b):
            h, c = _lstm_step(x[:, t], h, c, *weights)
        ends.append(tf.concat([h, c], -1).numpy())
    aux_targets = [_m(ends[k + 1], m_kernel, m_bias) for k in range(n - 1)]
    aux_targets.append(np.zeros_like(ends[0]))
    a_kernel, a_bias = tf.constant(a_kernel), tf.constant(a_bias)
    grads_sum = None
    m_targets = {}
    for k, (a, b) in enumerate(chunks):
        s0 = tf.constant(starts[k])
        with tf.GradientTape() as tape:
            tape.watch([x, s0, a_kernel, a_bias] + weights)
            h, c = s0[:, :units], s0[:, units:]
            loss = 0.0
            for t in range(a, b):
                h, c = _lstm_step(x[:, t], h, c, *weights)
                loss += tf.reduce_sum(h * r[:, t]) / denominator
            if k < n:
                end = tf.concat([h, c], -1)
                loss += tf.reduce_sum(end * _m(end.numpy(), m_kernel, m_bias) / batch)
                prediction = end @ a_kernel + a_bias
                error = tf.reduce_mean(tf.square(prediction - aux_targets[k]), -1)
                loss += w / n / batch * tf.reduce_sum(error)
        grads = tape.gradient(loss, [x, a_kernel, a_bias] + weights + [s0])
        grads = [
            np.zeros(v.shape, np.float32) if g is None else g.numpy()
            for g, v in zip(grads, [x, a_kernel, a_bias] + weights + [s0])
        ]
        if k > 0:
            m_targets[k - 1] = grads[-1] * batch
        grads_sum = (
            grads[:-1]
            if grads_sum is None
            else [acc + g for acc, g in zip(grads_sum, grads[:-1])]
        )
    features = 2 * units
    m_kernel_grad = np.zeros(m_kernel.shape)
    m_bias_grad = np.zeros(m_bias.shape)
    for k, target in m_targets.items():
        s = starts[k + 1]
        d_pred = 2.0 * (_m(s, m_kernel, m_bias) - target) / (batch * features)
        m_kernel_grad += s.T @ d_pred
        m_bias_grad += d_pred.sum(0)
    return grads_sum, m_kernel_grad, m_bias_grad


@pytest.mark.parametrize("aux_weight", [1.0, 3.0])
def test_dni_aux_gradients_match_a_hand_computation(aux_weight):
    x = _inputs((B, L, D_IN))
    r = _inputs((B, L, UNITS), seed=1)
    layer = DNIRNN(
        keras.layers.LSTMCell(UNITS),
        truncation=2,
        return_sequences=True,
        aux=True,
        aux_weight=aux_weight,
    )
    layer.build(x.shape)
    m_kernel, m_bias = set_random_gradient_model(layer.synthetic_gradient, seed=2)
    rng = np.random.default_rng(3)
    a_kernel = rng.normal(size=layer.aux_head.kernel.shape).astype("float32")
    a_bias = rng.normal(size=layer.aux_head.bias.shape).astype("float32")
    layer.aux_head.kernel.assign(a_kernel)
    layer.aux_head.bias.assign(a_bias)
    expected, m_kernel_grad, m_bias_grad = _hand_aux(
        x,
        _cell_weights(layer.cell),
        2,
        r,
        m_kernel,
        m_bias,
        a_kernel,
        a_bias,
        aux_weight,
    )
    cell = layer.cell
    variables = [layer.aux_head.kernel, layer.aux_head.bias]
    variables += [cell.kernel, cell.recurrent_kernel, cell.bias]
    variables += layer.synthetic_gradient.trainable_variables
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_mean(layer(xt, training=True) * r)
    got = tape.gradient(loss, [xt] + variables)
    for g, e in zip(got[:6], expected):
        np.testing.assert_allclose(g, e, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(got[6], m_kernel_grad, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(got[7], m_bias_grad, rtol=2e-4, atol=1e-6)
    assert np.abs(expected[1]).max() > 1e-4  # the head is trained
    # The auxiliary loss reaches the cell: aux=False gives other gradients.
    plain = DNIRNN(keras.layers.LSTMCell(UNITS), truncation=2, return_sequences=True)
    plain.build(x.shape)
    plain.cell.set_weights(cell.get_weights())
    plain.synthetic_gradient.set_weights(layer.synthetic_gradient.get_weights())
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(plain(xt, training=True) * r)
    plain_kernel = tape.gradient(loss, plain.cell.kernel)
    assert np.abs(plain_kernel - got[3]).max() > 1e-5


def test_dni_aux_in_inference_is_the_plain_rnn():
    x = _inputs((B, L, D_IN))
    layer = DNIRNN(keras.layers.LSTMCell(UNITS), truncation=2, aux=True)
    reference = keras.layers.RNN(keras.layers.LSTMCell(UNITS))
    layer.build(x.shape)
    reference.build(x.shape)
    reference.set_weights(layer.cell.get_weights())
    np.testing.assert_allclose(layer(x), reference(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------ stateful: sg_states
@pytest.mark.parametrize("sg_states", ["auto", "all"])
def test_stateful_lstm_injects_into_h_only_by_default(sg_states):
    """`auto` on a stateful LSTM: the batch's end gets M's h part only."""
    x = _inputs((B, 3, D_IN))
    r = _inputs((B, 3, UNITS), seed=1)
    layer = DNIRNN(
        keras.layers.LSTMCell(UNITS),
        truncation=3,
        stateful=True,
        return_sequences=True,
        stream_discount=0.5,
        sg_states=sg_states,
    )
    layer.build((B, 3, D_IN))
    m_kernel, m_bias = set_random_gradient_model(layer.synthetic_gradient)
    weights = _cell_weights(layer.cell)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_mean(layer(xt, training=True) * r)
    got = tape.gradient(loss, xt)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        h = c = tf.zeros((B, UNITS))
        hand = 0.0
        for t in range(3):
            h, c = _lstm_step(xt[:, t], h, c, *weights)
            hand += tf.reduce_sum(h * r[:, t]) / float(B * 3 * UNITS)
        synthetic = 0.5 * _m(tf.concat([h, c], -1).numpy(), m_kernel, m_bias) / B
        hand += tf.reduce_sum(h * synthetic[:, :UNITS])
        if sg_states == "all":
            hand += tf.reduce_sum(c * synthetic[:, UNITS:])
    np.testing.assert_allclose(got, tape.gradient(hand, xt), rtol=1e-4, atol=1e-7)


def test_stream_stays_bounded_and_learns():
    """A stream of copy episodes (T=5): M and the state stay bounded, N=1 is
    learned. The former behaviour (no discount, M's gradient on the cell
    state too) lets both grow by orders of magnitude within 300 steps."""
    kwargs = dict(units=64, batch_size=32, log_every=50, stages=[(1,), (2,)])
    result = streams.run_stream_task("copy", 5, "dni", 600, 0, **kwargs)
    assert result["max_length"] >= 1
    m_norms = [m for _, m, _ in result["m_norms"]]
    state_norms = [s for _, _, s in result["m_norms"]]
    assert np.isfinite(m_norms).all() and max(m_norms) < 10.0
    assert max(state_norms) < 50.0
    old = streams.run_stream_task(
        "copy", 5, "dni", 300, 0, stream_discount=1.0, sg_states="all", **kwargs
    )
    old_norms = [m for _, m, _ in old["m_norms"]]
    assert max(old_norms) > 10 * max(m_norms)


# ------------------------------------------------------------ repeat copy
def test_repeat_copy_episode_layout():
    rng = np.random.default_rng(0)
    x, y, w = streams.repeat_copy_episode(3, 2, rng, bits=4, max_repeats=5)
    pattern = np.random.default_rng(0).integers(0, 2, size=(3, 4)).astype("float32")
    assert x.shape == (11, 6) and y.shape == (11, 5) and w.shape == (11,)
    np.testing.assert_array_equal(x[:3, :4], pattern)
    np.testing.assert_array_equal(x[:3, 4:], 0.0)
    np.testing.assert_array_equal(x[3], np.float32([0, 0, 0, 0, 1, 0.4]))
    np.testing.assert_array_equal(x[4:], 0.0)
    np.testing.assert_array_equal(y[:4], 0.0)
    np.testing.assert_array_equal(y[4:10, :4], np.concatenate([pattern, pattern]))
    np.testing.assert_array_equal(y[4:10, 4], 0.0)
    np.testing.assert_array_equal(y[10], [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(w, [0] * 4 + [1] * 7)


def test_copy_episode_matches_the_copy_task_layout():
    x, y, w = streams.copy_episode(2, np.random.default_rng(1), bits=3)
    assert x.shape == (5, 5) and y.shape == (5, 4)
    np.testing.assert_array_equal(y[3:, :3], x[:2, :3])
    np.testing.assert_array_equal(x[2, 3:], [1, 0])
    np.testing.assert_array_equal(w, [0, 0, 0, 1, 1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"length": 0, "repeats": 1}, "`length`.*length=0"),
        ({"length": 2, "repeats": 11}, "`repeats`, expected at most.*repeats=11"),
        ({"length": 2, "repeats": 1.5}, "`repeats`.*repeats=1.5"),
    ],
)
def test_repeat_copy_episode_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        streams.repeat_copy_episode(rng=np.random.default_rng(0), **kwargs)


def test_repeat_copy_curriculum_raises_length_and_repeats_in_turn():
    stages = streams.repeat_copy_curriculum(max_length=3, max_repeats=2)
    assert stages == [(1, 1), (2, 1), (2, 2), (3, 2)]
    assert streams.copy_curriculum(2, 4) == [(2,), (3,), (4,)]


def test_episode_stream_concatenates_episodes():
    def counter(rng):
        x = np.arange(1, 5, dtype="float32")[:, None]
        return x, x, np.ones(4, "float32")

    stream = streams.EpisodeStream(counter, 3, np.random.default_rng(0))
    xs, ys, ws = zip(*[stream.next(3) for _ in range(5)])
    x = np.concatenate(xs, axis=1)[..., 0]
    np.testing.assert_array_equal(np.concatenate(ys, axis=1)[..., 0], x)
    for row, weights in zip(x, np.concatenate(ws, axis=1)):
        blank = int(np.argmax(row > 0))
        assert blank < 4 and (row[:blank] == 0).all() and (weights[:blank] == 0).all()
        body = row[blank:]
        np.testing.assert_array_equal(body, np.tile([1, 2, 3, 4], 5)[: len(body)])


def test_run_stream_task_errors():
    with pytest.raises(ValueError, match="`task`.*task='add'"):
        streams.run_stream_task("add", 2, "dni", 10, 0)
    with pytest.raises(ValueError, match="`method`.*method='cdni'"):
        streams.run_stream_task("copy", 2, "cdni", 10, 0)
    with pytest.raises(ValueError, match="`chunks`.*dni-aux.*chunks=1"):
        streams.run_stream_task("copy", 2, "dni-aux", 10, 0)


# ------------------------------------------------------------- character LM
def test_split_text_by_position():
    assert charlm.split_text("abcdefghij", (0.6, 0.2, 0.2)) == ("abcdef", "gh", "ij")
    text = charlm.load_text()
    assert len(text) > 400_000
    train, valid, test = charlm.split_text(text)
    assert train + valid + test == text
    assert len(train) == int(0.9 * len(text))
    assert abs(len(valid) - len(test)) <= 1


@pytest.mark.parametrize(
    "fractions", [(0.5, 0.5), (0.9, 0.2, -0.1), (0.5, 0.2, 0.2), ("a", 0.5, 0.5)]
)
def test_split_text_errors(fractions):
    with pytest.raises(ValueError, match="`fractions`.*Received: fractions="):
        charlm.split_text("abcdef", fractions)


def test_encode_maps_unknown_characters_to_the_last_id():
    vocabulary = charlm.make_vocabulary("abca")
    assert vocabulary == ["a", "b", "c"]
    np.testing.assert_array_equal(charlm.encode("cax", vocabulary), [2, 0, 3])


def test_bits_per_character_against_a_hand_computation():
    vocab, units, emb = 5, 3, 4
    model = charlm.build_charlm_model(
        vocab, 2, "dni", batch_size=2, units=units, embedding=emb
    )
    rng = np.random.default_rng(0)
    model.set_weights(
        [rng.normal(size=w.shape).astype("float32") * 0.7 for w in model.get_weights()]
    )
    rnn = model.get_layer("rnn")
    saved = [s.numpy() for s in rnn.states]
    rows = rng.integers(0, vocab, size=(2, 9))
    got = charlm.bits_per_character(model, rows, window=3)
    for variable, value in zip(rnn.states, saved):  # the state is restored
        np.testing.assert_array_equal(variable.numpy(), value)
    table = model.get_layer("embedding").embeddings.numpy()
    weights = _cell_weights(rnn.cell)
    dense = model.get_layer("readout")
    kernel, bias = dense.kernel.numpy(), dense.bias.numpy()
    total, count = 0.0, 0
    for row in rows:
        h = c = tf.zeros((1, units))
        for t in range(len(row) - 1):
            h, c = _lstm_step(table[row[t]][None], h, c, *weights)
            logits = h.numpy()[0].astype(np.float64) @ kernel + bias
            log_p = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
            total += -log_p[row[t + 1]] / np.log(2.0)
            count += 1
    np.testing.assert_allclose(got, total / count, rtol=1e-5)


# ---------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    "argv, message",
    [
        (["charlm", "--stream-discount", "1.5"], "--stream-discount must be in"),
        (["charlm", "--methods", "cdni"], "invalid method"),
        (["repeat-copy", "--chunks", "0"], "--chunks must be a positive integer"),
        (["charlm", "--patience", "0"], "--patience must be a positive integer"),
        (["charlm", "--aux-weight", "-1"], "--aux-weight must be non-negative"),
        (["charlm", "--first-seed", "-1"], "--first-seed must be non-negative"),
    ],
)
def test_cli_rejects_bad_stream_options(argv, message, capsys):
    from keras_dni.benchmarks import cli

    with pytest.raises(SystemExit):
        cli.main(argv + ["--out", "/nonexistent/never"])
    assert message in capsys.readouterr().err


def test_cli_registers_the_stream_tasks():
    from keras_dni.benchmarks import cli
    from keras_dni.benchmarks import recurrent_runs

    assert cli.RUNNERS["repeat-copy"] is recurrent_runs.stream_runs
    assert cli.RUNNERS["charlm"] is recurrent_runs.charlm_runs


def test_cli_smoke_charlm(tmp_path):
    import json

    from keras_dni.benchmarks import cli

    out = str(tmp_path)
    common = ["--small", "--seeds", "1", "--truncations", "2", "--out", out]
    cli.main(["charlm", "--methods", "dni-aux"] + common)
    (record,) = json.load(open(f"{out}/results.json"))
    assert record["task"] == "charlm" and record["method"] == "dni-aux"
    assert record["truncation"] == record["config"]["truncation"] == 2
    assert np.isfinite(record["metrics"]["test_bpc"])
    # The record names the clip used: DNIRNN's default, or the option's.
    assert record["config"]["sg_prediction_clip"] == RECURRENT_PREDICTION_CLIP == 1.0
    cli.main(
        ["charlm", "--sg-prediction-clip", "none", "--out", out + "/none"]
        + common[:-2]
        + ["--methods", "dni"]
    )
    (record,) = json.load(open(f"{out}/none/results.json"))
    assert record["config"]["sg_prediction_clip"] is None
    assert record["seed"] == 0


def test_cli_first_seed_adds_seeds(tmp_path):
    import json

    from keras_dni.benchmarks import cli

    out = str(tmp_path)
    argv = ["charlm", "--small", "--methods", "bptt", "--truncations", "2"]
    cli.main(argv + ["--seeds", "2", "--first-seed", "3", "--out", out])
    records = json.load(open(f"{out}/results.json"))
    assert [r["seed"] for r in records] == [3, 4]


def test_cli_smoke_copy_stream(tmp_path):
    import json

    from keras_dni.benchmarks import cli

    out = str(tmp_path)
    common = ["--small", "--seeds", "1", "--truncations", "2", "--out", out]
    cli.main(["copy", "--protocol", "stream", "--methods", "backprop,dni"] + common)
    records = json.load(open(f"{out}/results.json"))
    assert [r["method"] for r in records] == ["bptt", "dni"]
    assert all(r["config"]["protocol"] == "stream" for r in records)
    assert all(r["config"]["start_length"] == 1 for r in records)
    assert all(r["metrics"]["max_length"] >= 0 for r in records)


@pytest.mark.parametrize(
    "module", ["keras_dni.benchmarks.streams", "keras_dni.benchmarks.charlm"]
)
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


def test_aux_round_trips_through_config_and_weights():
    layer = DNIRNN(keras.layers.LSTMCell(UNITS), truncation=2, aux=True, aux_weight=0.5)
    layer.build((B, L, D_IN))
    clone = DNIRNN.from_config(layer.get_config())
    clone.build((B, L, D_IN))
    assert clone.aux and clone.aux_weight == 0.5
    assert len(clone.get_weights()) == len(layer.get_weights())
    clone.set_weights(layer.get_weights())
    names = [w.path for w in layer.trainable_weights]
    assert any("aux_head" in n for n in names)


def test_episodic_copy_task_runs_dni_aux():
    from keras_dni.benchmarks import copy_task

    result = copy_task.run_copy_task(
        3, True, 10, 0, units=8, batch_size=4, start_length=2, window=5, aux=True
    )
    assert result["steps"] == 10 and result["max_length"] >= 0
