"""DNIConv2D and SyntheticGradient on 3-D/4-D inputs: forward, gradients."""

import inspect
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_solution_close
from helpers import layer_norm
from helpers import mse_loss
from helpers import ridge_solution

import keras_dni

B, SIZE, C_IN, FILTERS, D_OUT = 4, 6, 2, 3, 3


def _image_norm(h):
    """Parameter-free norm of a 4-D (NHWC) gradient-model input: over C."""
    h = np.asarray(h, dtype=np.float64)
    mean = h.mean(-1, keepdims=True)
    var = h.var(-1, keepdims=True)
    return (h - mean) / np.sqrt(var + 1e-6)


def _conv_same(x, kernel, bias):
    """Same-padded stride-1 convolution by hand (tf.nn.conv2d, NHWC)."""
    out = tf.nn.conv2d(
        tf.constant(x, tf.float32), tf.constant(kernel), 1, padding="SAME"
    )
    return (out + bias).numpy()


def _randomize(layer, seed, scale=0.5):
    """Random values for every weight of a Keras layer; returns them."""
    rng = np.random.default_rng(seed)
    values = []
    for v in layer.weights:
        value = (rng.normal(size=v.shape) * scale).astype("float32")
        v.assign(value)
        values.append(value)
    return values


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, SIZE, SIZE, C_IN)).astype("float32")
    y = rng.normal(size=(B, D_OUT)).astype("float32")
    return x, y


def _model(**kwargs):
    return keras.Sequential(
        [
            keras.Input((SIZE, SIZE, C_IN)),
            keras_dni.DNIConv2D(
                FILTERS, 3, activation="tanh", padding="same", name="dni", **kwargs
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(D_OUT, name="out"),
        ]
    )


# ------------------------------------------------------------------ DNIConv2D
def test_forward_equals_conv2d():
    x, _ = _data()
    dni = keras_dni.DNIConv2D(FILTERS, 3, strides=2, activation="relu")
    conv = keras.layers.Conv2D(FILTERS, 3, strides=2, activation="relu")
    dni.build(x.shape)
    conv.build(x.shape)
    conv.set_weights(dni.get_weights()[:2])
    np.testing.assert_array_equal(dni(x), conv(x))
    np.testing.assert_array_equal(dni(x, training=True), conv(x, training=True))
    assert dni.synthetic_gradient.built


@pytest.mark.parametrize(
    "sg_kernel_size, solver",
    [(None, "gradient"), (3, "gradient"), (None, "least_squares")],
)
def test_gradients_match_hand_written_tape(sg_kernel_size, solver):
    """Kernel/bias get dh/dW with output_gradients=M(h)/B; M the L2 grad
    (`solver="gradient"`) or, refitted in the backward pass, the ridge
    regression of the per-example gradient on [normed h, 1] per position."""
    x, y = _data()
    model = _model(sg_kernel_size=sg_kernel_size, sg_solver=solver)
    layer = model.get_layer("dni")
    sg = layer.synthetic_gradient
    m_kernel, m_bias = _randomize(sg._input_dense, seed=1)
    k = sg_kernel_size or 1
    assert m_kernel.shape == (k, k, FILTERS, FILTERS)

    with tf.GradientTape() as tape:
        loss = mse_loss(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    got = {v.path: g.numpy() for v, g in zip(model.trainable_variables, grads)}

    # Hand computation with plain TensorFlow ops on copies of the weights.
    w1, b1 = tf.constant(layer.kernel.numpy()), tf.constant(layer.bias.numpy())
    out = model.get_layer("out")
    w2, b2 = tf.constant(out.kernel.numpy()), tf.constant(out.bias.numpy())
    with tf.GradientTape(persistent=True) as t:
        t.watch([w1, b1, w2, b2])
        h = tf.tanh(tf.nn.conv2d(x, w1, 1, padding="SAME") + b1)
        loss_ref = mse_loss(y, tf.reshape(h, (B, -1)) @ w2 + b2)
    true_dh = t.gradient(loss_ref, h).numpy()
    normed = _image_norm(h.numpy())
    pred = _conv_same(normed, m_kernel, m_bias)
    exp_w1, exp_b1 = t.gradient(h, [w1, b1], output_gradients=pred / B)
    exp_w2, exp_b2 = t.gradient(loss_ref, [w2, b2])
    np.testing.assert_allclose(got[layer.kernel.path], exp_w1, atol=1e-5)
    np.testing.assert_allclose(got[layer.bias.path], exp_b1, atol=1e-5)
    np.testing.assert_allclose(got[out.kernel.path], exp_w2, atol=1e-5)
    np.testing.assert_allclose(got[out.bias.path], exp_b2, atol=1e-5)

    if solver == "least_squares":
        # M is not trained by an optimizer: its weights get no gradient, and
        # the backward pass (stock `train_step`) refitted them on this batch.
        assert not {id(v) for v in sg.weights} & {
            id(v) for v in model.trainable_variables
        }
        rows = normed.reshape(-1, FILTERS)
        z = np.hstack([rows, np.ones((len(rows), 1))])
        solution = ridge_solution(z, (true_dh * B).reshape(-1, FILTERS))
        kernel = sg._input_dense.kernel.numpy().reshape(FILTERS, FILTERS)
        assert_solution_close(np.vstack([kernel, sg._input_dense.bias[None]]), solution)
        return
    # M: gradient of mean((M(h) - B * dL/dh)^2) over batch, H, W, C.
    mk, mb = tf.constant(m_kernel), tf.constant(m_bias)
    with tf.GradientTape() as t:
        t.watch([mk, mb])
        m_pred = tf.nn.conv2d(normed.astype("float32"), mk, 1, "SAME") + mb
        m_loss = tf.reduce_mean(tf.square(m_pred - true_dh * B))
    exp_mk, exp_mb = t.gradient(m_loss, [mk, mb])
    np.testing.assert_allclose(
        got[sg._input_dense.kernel.path], exp_mk, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        got[sg._input_dense.bias.path], exp_mb, rtol=1e-4, atol=1e-5
    )


def test_hidden_conv_gradient_model_matches_hand_computation():
    """conv k x k -> batch norm (batch statistics) -> ReLU -> conv k x k."""
    h = np.random.default_rng(0).normal(size=(B, 5, 5, FILTERS)).astype("float32")
    sg = keras_dni.SyntheticGradient(hidden_units=(4,), batch_norm=True)
    sg.build(h.shape)
    first, bn, last = sg._input_dense, *sg._model_layers
    assert isinstance(bn, keras.layers.BatchNormalization)
    assert isinstance(first, keras.layers.Conv2D)
    assert first.kernel.shape == (3, 3, FILTERS, 4)
    assert last.kernel.shape == (3, 3, 4, FILTERS)
    # The last convolution starts at zero: M predicts zero gradients.
    np.testing.assert_array_equal(sg.predict_gradient(h), np.zeros_like(h))
    k1, b1 = first.get_weights()
    k2, b2 = _randomize(last, seed=2)
    z = _conv_same(_image_norm(h), k1, b1)
    mean, var = z.mean((0, 1, 2)), z.var((0, 1, 2))
    z = np.maximum((z - mean) / np.sqrt(var + 1e-3), 0.0)  # gamma 1, beta 0
    np.testing.assert_allclose(
        sg.predict_gradient(h), _conv_same(z, k2, b2), rtol=1e-4, atol=1e-4
    )


def test_get_config_has_every_constructor_argument():
    layer = keras_dni.DNIConv2D(
        5,
        (3, 2),
        strides=2,
        padding="same",
        activation="relu",
        sg_hidden_units=(8,),
        sg_batch_norm=True,
        sg_kernel_size=5,
        conditional=True,
        label_dim=3,
        bp_lambda=0.25,
        sg_input_normalization=None,
    )
    config = layer.get_config()
    params = set(inspect.signature(keras_dni.DNIConv2D.__init__).parameters)
    assert params - {"self", "kwargs"} <= set(config)
    clone = keras_dni.DNIConv2D.from_config(config)
    assert clone.get_config() == config
    sg = clone.synthetic_gradient
    assert (sg.hidden_units, sg.kernel_size, sg.label_dim) == ((8,), 5, 3)
    sg_config = keras_dni.SyntheticGradient(kernel_size=3).get_config()
    assert sg_config["kernel_size"] == 3
    assert keras_dni.SyntheticGradient.from_config(sg_config).kernel_size == 3


def _sg_weights(model):
    return [
        v.numpy()
        for layer in keras_dni.synthetic_gradient_layers(model)
        for v in layer.weights
    ]


def test_keras_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(32, 8, 8, 1)).astype("float32")
    y = np.arange(32) % 3
    model = keras_dni.DNISequential(
        [
            keras.Input((8, 8, 1)),
            keras_dni.DNIConv2D(4, 3, activation="relu", conditional=True),
            keras.layers.MaxPooling2D(),
            keras_dni.DNIConv2D(
                4, 3, activation="relu", sg_hidden_units=(5,), sg_batch_norm=True
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert any(np.abs(w).max() > 0 for w in _sg_weights(model))
    path = os.path.join(tmp_path, "cnn.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert type(loaded.layers[0]) is keras_dni.DNIConv2D
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    )
    for a, b in zip(_sg_weights(model), _sg_weights(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    loaded.fit(x, y, batch_size=8, verbose=0)  # training resumes


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sg_kernel_size": 0}, ValueError, "`sg_kernel_size`.*=0"),
        ({"sg_hidden_units": "8"}, TypeError, "`sg_hidden_units`"),
        ({"sg_batch_norm": "no"}, TypeError, "`sg_batch_norm`, expected a bool"),
        ({"sg_input_normalization": "x"}, ValueError, "`sg_input_normalization`"),
        ({"bp_lambda": 2.0}, ValueError, "`bp_lambda`.*=2.0"),
        ({"label_dim": -1}, ValueError, "`label_dim`"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_dni.DNIConv2D(4, 3, **kwargs)


def test_synthetic_gradient_argument_errors():
    with pytest.raises(ValueError, match="`kernel_size`.*Received: kernel_size=0"):
        keras_dni.SyntheticGradient(kernel_size=0)
    with pytest.raises(ValueError, match="`data_format`.*'channels_middle'"):
        keras_dni.SyntheticGradient(data_format="channels_middle")
    layer = keras_dni.SyntheticGradient(kernel_size=3)
    with pytest.raises(ValueError, match="`kernel_size`.*only applies to 4-D.*rank 2"):
        layer.build((None, 5))


# ------------------------------------------- SyntheticGradient, 3-D and 4-D
def _cut_and_gradient(layer, x, weights_fn, hand_fn):
    """Identity forward; with zero M no gradient passes; then M(h)/B does.

    (`layer` without `prediction_clip`: the clip's own references are in
    test_prediction_clip.py.)
    """
    x = tf.constant(x)
    below = tf.Variable(tf.ones(x.shape[1:]))

    def grad():
        with tf.GradientTape() as tape:
            out = layer(x * below, training=True)
            # A loss whose true gradient at h is 2 * h / size, never zero.
            loss = tf.reduce_mean(tf.square(out))
        np.testing.assert_array_equal(out, x)  # forward: identity
        return tape.gradient(loss, below).numpy()

    np.testing.assert_array_equal(grad(), np.zeros(x.shape[1:]))  # cut
    pred = hand_fn(x.numpy(), *weights_fn(layer))
    expected = (pred / x.shape[0] * x.numpy()).sum(0)
    np.testing.assert_allclose(grad(), expected, rtol=1e-4, atol=1e-6)


def test_rank3_identity_forward_and_per_step_gradient():
    x = np.random.default_rng(0).normal(size=(3, 5, 4)).astype("float32")
    layer = keras_dni.SyntheticGradient(prediction_clip=None)
    layer.build(x.shape)
    assert isinstance(layer._input_dense, keras.layers.Dense)
    _cut_and_gradient(
        layer,
        x,
        lambda sg: _randomize(sg._input_dense, seed=3),
        lambda h, k, b: layer_norm(h) @ k + b,  # per example and time step
    )


@pytest.mark.parametrize("kernel_size", [None, 3])
def test_rank4_identity_forward_and_convolutional_gradient(kernel_size):
    x = np.random.default_rng(0).normal(size=(3, 4, 5, 2)).astype("float32")
    layer = keras_dni.SyntheticGradient(kernel_size=kernel_size, prediction_clip=None)
    layer.build(x.shape)
    assert isinstance(layer._input_dense, keras.layers.Conv2D)
    _cut_and_gradient(
        layer,
        x,
        lambda sg: _randomize(sg._input_dense, seed=4),
        lambda h, k, b: _conv_same(_image_norm(h), k, b),
    )


def test_rank4_channels_first():
    x = np.random.default_rng(0).normal(size=(3, 2, 4, 5)).astype("float32")
    layer = keras_dni.SyntheticGradient(
        kernel_size=3, data_format="channels_first", prediction_clip=None
    )
    layer.build(x.shape)
    assert layer._input_dense.kernel.shape == (3, 3, 2, 2)

    def hand(h, k, b):
        nhwc = np.transpose(h, (0, 2, 3, 1))
        return np.transpose(_conv_same(_image_norm(nhwc), k, b), (0, 3, 1, 2))

    _cut_and_gradient(layer, x, lambda sg: _randomize(sg._input_dense, seed=5), hand)


@pytest.mark.parametrize("normalization", ["auto", "layer"])
def test_rank4_conditional_labels_broadcast_over_positions(normalization):
    h = np.random.default_rng(0).normal(size=(3, 4, 4, 2)).astype("float32")
    labels = np.array([0, 2, 1])
    layer = keras_dni.SyntheticGradient(
        conditional=True, label_dim=3, input_normalization=normalization
    )
    layer.build(h.shape)
    k, b = _randomize(layer._input_dense, seed=6)
    (label_kernel,) = _randomize(layer._label_projection, seed=7)
    # "auto": a conditional least-squares M sees the raw h.
    features = _image_norm(h) if normalization == "layer" else h
    expected = (
        _conv_same(features, k, b)
        + (np.eye(3)[labels] @ label_kernel)[:, None, None, :]
    )
    np.testing.assert_allclose(
        layer.predict_gradient(h, labels), expected, rtol=1e-4, atol=1e-5
    )
