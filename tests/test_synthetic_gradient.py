"""SyntheticGradient / DNIDense: forward, gradients, upstream cut, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_solution_close
from helpers import layer_norm
from helpers import linear_prediction
from helpers import mse_loss
from helpers import ridge_solution
from helpers import set_random_gradient_model

import keras_dni

B, D_IN, UNITS, D_OUT = 8, 5, 4, 3


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, D_IN)).astype("float32")
    y = rng.normal(size=(B, D_OUT)).astype("float32")
    return x, y


def _model(**kwargs):
    return keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras_dni.DNIDense(UNITS, activation="tanh", name="dni", **kwargs),
            keras.layers.Dense(D_OUT, name="out"),
        ]
    )


def test_forward_equals_dense():
    x, _ = _data()
    dni = keras_dni.DNIDense(UNITS, activation="relu")
    dense = keras.layers.Dense(UNITS, activation="relu")
    dni.build((None, D_IN))
    dense.build((None, D_IN))
    dense.set_weights(dni.get_weights()[:2])
    np.testing.assert_allclose(dni(x), dense(x), rtol=1e-6)
    np.testing.assert_allclose(
        dni(x, training=True), dense(x, training=True), rtol=1e-6
    )


def test_dense_auto_initializer_is_he_for_relu_only():
    kinds = {
        "relu": keras.initializers.HeNormal,
        keras.activations.relu: keras.initializers.HeNormal,
        "tanh": keras.initializers.GlorotUniform,
        None: keras.initializers.GlorotUniform,
    }
    for activation, kind in kinds.items():
        layer = keras_dni.DNIDense(4, activation=activation)
        assert isinstance(layer.kernel_initializer, kind), activation
        # The chosen initialiser is what the config records and restores.
        again = keras_dni.DNIDense.from_config(layer.get_config())
        assert isinstance(again.kernel_initializer, kind), activation
    chosen = keras_dni.DNIDense(4, activation="relu", kernel_initializer="zeros")
    assert isinstance(chosen.kernel_initializer, keras.initializers.Zeros)
    # Configs written before "auto" name their initialiser: it is kept.
    config = keras.layers.Dense(4, activation="relu").get_config()
    old = keras_dni.DNIDense.from_config(config)
    assert isinstance(old.kernel_initializer, keras.initializers.GlorotUniform)
    # He normal's scale, by hand: variance 2 / fan_in.
    keras.utils.set_random_seed(0)
    wide = keras_dni.DNIDense(512, activation="relu")
    wide.build((None, 512))
    np.testing.assert_allclose(np.var(wide.kernel.numpy()), 2 / 512, rtol=0.05)


def test_inference_is_identity_without_gradient_model_work():
    layer = keras_dni.SyntheticGradient()
    x = tf.random.normal((4, 3))
    assert layer(x) is x
    assert layer(x, training=False) is x


@pytest.mark.parametrize("solver", ["gradient", "least_squares"])
def test_gradients_match_hand_written_tape(solver):
    """Kernel/bias get dh/dW with output_gradients=M(h)/B; M the L2 grad
    (`solver="gradient"`) or, refitted in the backward pass, the ridge
    regression of the per-example gradient on [layer_norm(h), 1]."""
    x, y = _data()
    model = _model(sg_solver=solver)
    layer = model.get_layer("dni")
    sg = layer.synthetic_gradient
    m_kernel, m_bias = set_random_gradient_model(sg)

    with tf.GradientTape() as tape:
        loss = mse_loss(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    got = {v.path: g for v, g in zip(model.trainable_variables, grads)}

    # Hand computation with plain TensorFlow ops on the same weights.
    w1, b1 = tf.constant(layer.kernel.numpy()), tf.constant(layer.bias.numpy())
    w2 = tf.constant(model.get_layer("out").kernel.numpy())
    b2 = tf.constant(model.get_layer("out").bias.numpy())
    with tf.GradientTape(persistent=True) as t:
        t.watch([w1, b1, w2, b2])
        h = tf.tanh(x @ w1 + b1)
        loss_ref = mse_loss(y, h @ w2 + b2)
    true_dh = t.gradient(loss_ref, h).numpy()  # incoming gradient at h
    pred = linear_prediction(h.numpy(), m_kernel, m_bias)
    exp_w1, exp_b1 = t.gradient(h, [w1, b1], output_gradients=pred / B)
    exp_w2, exp_b2 = t.gradient(loss_ref, [w2, b2])

    np.testing.assert_allclose(got[layer.kernel.path], exp_w1, atol=1e-6)
    np.testing.assert_allclose(got[layer.bias.path], exp_b1, atol=1e-6)
    np.testing.assert_allclose(
        got[model.get_layer("out").kernel.path], exp_w2, atol=1e-6
    )
    np.testing.assert_allclose(got[model.get_layer("out").bias.path], exp_b2, atol=1e-6)

    target = true_dh * B
    inputs = layer_norm(h.numpy())
    if solver == "least_squares":
        # M is not trained by an optimizer: its weights get no gradient, and
        # the backward pass (stock `train_step`) refitted them on this batch.
        assert not {id(v) for v in sg.weights} & {
            id(v) for v in model.trainable_variables
        }
        solution = ridge_solution(np.hstack([inputs, np.ones((B, 1))]), target)
        m_weights = np.vstack([sg._input_dense.kernel, sg._input_dense.bias[None]])
        assert_solution_close(m_weights, solution)
        return
    # M: d/dθ of mean((M(h) - B * dL/dh)^2) over batch and features.
    d_pred = 2.0 * (pred - target) / (B * UNITS)
    exp_m_kernel = inputs.T @ d_pred
    exp_m_bias = d_pred.sum(0)
    np.testing.assert_allclose(
        got[sg._input_dense.kernel.path], exp_m_kernel, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        got[sg._input_dense.bias.path], exp_m_bias, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("solver", ["gradient", "least_squares"])
def test_target_is_batch_size_invariant(solver):
    """The same examples give the same M gradient (the same least-squares
    fit) at batch 8 and batch 16."""
    x, y = _data()
    model = _model(sg_solver=solver)
    sg = model.get_layer("dni").synthetic_gradient
    set_random_gradient_model(sg)
    m_kernel = sg._input_dense.kernel

    def m_grad(xb, yb):
        if solver == "least_squares":
            # From zero moments: M after the fit in the backward pass.
            for moment in sg._solver_state.weights:
                moment.assign(tf.zeros_like(moment))
        with tf.GradientTape() as tape:
            loss = mse_loss(yb, model(xb, training=True))
        grad = tape.gradient(loss, m_kernel)
        return m_kernel.numpy() if solver == "least_squares" else grad.numpy()

    # Duplicating the batch doubles B but leaves the per-example gradients
    # (and therefore M's loss gradient, an average, and the batch moments
    # of the least-squares fit) unchanged.
    once = m_grad(x, y)
    twice = m_grad(np.concatenate([x, x]), np.concatenate([y, y]))
    if solver == "least_squares":
        # Other sums, rounded otherwise, through the ridge solve (helpers).
        assert_solution_close(once, twice)
    else:
        np.testing.assert_allclose(once, twice, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("solver", ["gradient", "least_squares"])
def test_upstream_cut(solver):
    """Below a SyntheticGradient no gradient depends on the labels."""
    x, y = _data()
    inputs = keras.Input((D_IN,))
    h = keras.layers.Dense(6, activation="relu", name="below")(inputs)
    h = keras_dni.DNIDense(UNITS, activation="tanh", name="dni", sg_solver=solver)(h)
    outputs = keras.layers.Dense(D_OUT, name="out")(h)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    model.fit(x, y, epochs=5, verbose=0)  # M is no longer zero
    sg = model.get_layer("dni").synthetic_gradient
    assert np.abs(sg._input_dense.kernel.numpy()).max() > 0

    below = model.get_layer("below").trainable_variables + [
        model.get_layer("dni").kernel,
        model.get_layer("dni").bias,
    ]

    # One forward pass, two losses: a least-squares M is refitted by every
    # backward pass (the stock `train_step` path), so a second forward pass
    # would use another M, whatever the labels.
    with tf.GradientTape(persistent=True) as tape:
        y_pred = model(x, training=True)
        losses = [
            mse_loss(labels, y_pred)
            for labels in (y, y + 3.0 * np.random.normal(size=y.shape))
        ]
    g1, g2 = ([g.numpy() for g in tape.gradient(loss, below)] for loss in losses)
    assert any(np.abs(g).max() > 0 for g in g1)
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(a, b)


def test_bp_lambda_one_is_exact_backprop():
    x, y = _data()
    model = _model(bp_lambda=1.0)
    set_random_gradient_model(model.get_layer("dni").synthetic_gradient)
    plain = keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras.layers.Dense(UNITS, activation="tanh"),
            keras.layers.Dense(D_OUT),
        ]
    )
    plain.set_weights(
        [model.get_layer("dni").kernel, model.get_layer("dni").bias]
        + model.get_layer("out").get_weights()
    )
    model_vars = [
        model.get_layer("dni").kernel,
        model.get_layer("dni").bias,
    ] + model.get_layer("out").trainable_variables
    with tf.GradientTape() as t1:
        l1 = mse_loss(y, model(x, training=True))
    with tf.GradientTape() as t2:
        l2 = mse_loss(y, plain(x, training=True))
    for a, b in zip(
        t1.gradient(l1, model_vars),
        t2.gradient(l2, plain.trainable_variables),
    ):
        np.testing.assert_array_equal(a, b)


def test_bp_lambda_mixes_linearly():
    x, y = _data()
    grads = {}
    for lam in (0.0, 0.3, 1.0):
        keras.utils.set_random_seed(0)
        model = _model(bp_lambda=lam)
        set_random_gradient_model(model.get_layer("dni").synthetic_gradient)
        with tf.GradientTape() as tape:
            loss = mse_loss(y, model(x, training=True))
        grads[lam] = tape.gradient(loss, model.get_layer("dni").kernel)
    np.testing.assert_allclose(
        grads[0.3], 0.7 * grads[0.0] + 0.3 * grads[1.0], rtol=1e-5, atol=1e-7
    )


def test_rank3_inputs_per_time_step():
    layer = keras_dni.SyntheticGradient()
    x = tf.random.normal((2, 5, 3))
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x, training=True)
        loss = tf.reduce_sum(out)
    np.testing.assert_array_equal(out, x)
    # Zero-initialised M: the synthetic gradient is zero at first.
    np.testing.assert_array_equal(tape.gradient(loss, x), tf.zeros_like(x))


def test_regression_loss_falls_in_training():
    """With the network frozen (lr 0) M's targets are fixed: it must fit."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 10)).astype("float32")
    y = (x[:, :3] ** 2 - x[:, 3:6]).astype("float32")
    # M trained by sg_optimizer (the 'gradient' solver): this test checks
    # that path; the least-squares solver is checked in test_solver.py
    model = keras_dni.DNISequential(
        [
            keras.Input((10,)),
            keras_dni.DNIDense(32, activation="relu", name="h", sg_solver="gradient"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.0),
        "mse",
        sg_optimizer=keras.optimizers.Adam(1e-2),
    )
    history = model.fit(x, y, batch_size=32, epochs=10, verbose=0)
    sg_loss = history.history["sg_loss_h"]
    assert sg_loss[-1] < 0.6 * sg_loss[0]
    assert all(b <= a * 1.001 for a, b in zip(sg_loss, sg_loss[1:]))
    assert history.history["sg_loss"] == sg_loss


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"hidden_units": "64"}, TypeError, "`hidden_units`.*Received: hidden"),
        ({"hidden_units": (64, 0)}, ValueError, r"positive integers.*\(64, 0\)"),
        ({"batch_norm": 1}, TypeError, "`batch_norm`, expected a bool"),
        ({"conditional": "yes"}, TypeError, "`conditional`, expected a bool"),
        ({"label_dim": 0}, ValueError, "`label_dim`.*Received: label_dim=0"),
        ({"bp_lambda": 1.5}, ValueError, r"`bp_lambda`.*\[0, 1\].*=1.5"),
        ({"bp_lambda": "0"}, TypeError, "`bp_lambda`"),
        (
            {"input_normalization": "batch"},
            ValueError,
            "`input_normalization`.*'layer', None.*'batch'",
        ),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_dni.SyntheticGradient(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"units": 0}, ValueError, "`units`.*Received: units=0"),
        ({"units": 4, "sg_hidden_units": [-1]}, ValueError, "`sg_hidden_units`"),
        ({"units": 4, "bp_lambda": -0.1}, ValueError, "`bp_lambda`"),
        ({"units": 4, "conditional": 1}, TypeError, "`conditional`"),
    ],
)
def test_dense_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_dni.DNIDense(**kwargs)


def test_dense_get_config_has_every_constructor_argument():
    import inspect

    layer = keras_dni.DNIDense(
        7,
        activation="relu",
        sg_hidden_units=(16,),
        sg_batch_norm=True,
        conditional=True,
        label_dim=3,
        bp_lambda=0.25,
        sg_input_normalization=None,
    )
    config = layer.get_config()
    params = set(inspect.signature(keras_dni.DNIDense.__init__).parameters)
    params -= {"self", "kwargs", "lora_rank", "lora_alpha"}
    assert params <= set(config)
    clone = keras_dni.DNIDense.from_config(config)
    assert clone.get_config() == config
    sg_params = set(
        inspect.signature(keras_dni.SyntheticGradient.__init__).parameters
    ) - {"self", "kwargs"}
    assert sg_params <= set(keras_dni.SyntheticGradient().get_config())
