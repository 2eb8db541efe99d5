"""DNISequential / DNIModel: train_step, cDNI, metrics, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_solution_close
from helpers import assert_weights_close
from helpers import layer_norm
from helpers import least_squares_weights
from helpers import linear_prediction
from helpers import ridge_solution
from helpers import set_random_gradient_model

import keras_dni

B, D_IN, UNITS, D_OUT = 8, 5, 4, 3


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, D_IN)).astype("float32")
    y = rng.normal(size=(B, D_OUT)).astype("float32")
    return x, y


@pytest.mark.parametrize("solver", ["gradient", "least_squares"])
def test_train_step_applies_exact_updates(solver):
    """Main weights: SGD step on the synthetic-gradient gradient; M: SGD
    step on its regression gradient (or, least squares: the ridge solution
    on this batch); output layer: true gradient."""
    x, y = _data()
    lr, sg_lr = 0.1, 0.05
    model = keras_dni.DNISequential(
        [
            keras.Input((D_IN,)),
            keras_dni.DNIDense(UNITS, activation="tanh", name="dni", sg_solver=solver),
            keras.layers.Dense(D_OUT, name="out"),
        ]
    )
    model.compile(
        keras.optimizers.SGD(lr),
        "mse",
        sg_optimizer=keras.optimizers.SGD(sg_lr),
    )
    layer = model.get_layer("dni")
    m_kernel, m_bias = set_random_gradient_model(layer.synthetic_gradient)
    w1, b1 = layer.kernel.numpy(), layer.bias.numpy()
    w2, b2 = model.get_layer("out").get_weights()

    # Independent numpy computation.
    pre = x @ w1 + b1
    h = np.tanh(pre)
    out = h @ w2 + b2
    d_out = 2.0 * (out - y) / out.size
    true_dh = d_out @ w2.T
    pred = linear_prediction(h, m_kernel, m_bias)
    d_pre = (pred / B) * (1.0 - h**2)
    target = true_dh * B
    d_pred = 2.0 * (pred - target) / pred.size
    expected = {
        "w1": w1 - lr * x.T @ d_pre,
        "b1": b1 - lr * d_pre.sum(0),
        "w2": w2 - lr * h.T @ d_out,
        "b2": b2 - lr * d_out.sum(0),
        "mk": m_kernel - sg_lr * layer_norm(h).T @ d_pred,
        "mb": m_bias - sg_lr * d_pred.sum(0),
    }
    model.train_on_batch(x, y)
    sg = layer.synthetic_gradient
    got = {
        "w1": layer.kernel,
        "b1": layer.bias,
        "w2": model.get_layer("out").kernel,
        "b2": model.get_layer("out").bias,
        "mk": sg._input_dense.kernel,
        "mb": sg._input_dense.bias,
    }
    if solver == "least_squares":
        # M: the ridge solution on this batch, [kernel; bias] (helpers).
        solution = ridge_solution(np.hstack([layer_norm(h), np.ones((B, 1))]), target)
        assert_solution_close(np.vstack([got.pop("mk"), got.pop("mb")[None]]), solution)
        del expected["mk"], expected["mb"]
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("solver", ["gradient", "least_squares"])
def test_optimizers_update_disjoint_variables(solver):
    model = keras_dni.DNISequential(
        [
            keras.Input((D_IN,)),
            keras_dni.DNIDense(UNITS, name="dni", sg_solver=solver),
            keras.layers.Dense(D_OUT),
        ]
    )
    model.compile("adam", "mse")
    model.fit(*_data(), verbose=0)
    main, sg = model._dni_variables()
    sg_layer = model.get_layer("dni").synthetic_gradient
    assert {id(v) for v in sg} == {id(v) for v in sg_layer.trainable_variables}
    assert not {id(v) for v in main} & {id(v) for v in sg}
    assert model.optimizer.iterations.numpy() == 1
    if solver == "gradient":
        assert model.sg_optimizer.iterations.numpy() == 1
    else:
        # A least-squares M is in neither optimizer: it is fitted.
        assert not sg
        assert not {id(v) for v in main} & {id(v) for v in sg_layer.weights}


def _conditional_model(cls=keras_dni.DNISequential, classes=4):
    return cls(
        [
            keras.Input((D_IN,)),
            keras_dni.DNIDense(UNITS, activation="relu", conditional=True, name="cdni"),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )


def test_conditional_labels_reach_gradient_model():
    x = np.random.default_rng(0).normal(size=(32, D_IN)).astype("float32")
    y = np.arange(32) % 4
    model = _conditional_model()
    model.compile("adam", "sparse_categorical_crossentropy")
    sg = model.get_layer("cdni").synthetic_gradient
    assert sg.label_dim == 4
    before = sg._label_projection.kernel.numpy().copy()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    after = sg._label_projection.kernel.numpy()
    assert np.abs(after - before).max() > 0

    h = model.get_layer("cdni")(x)
    p1 = sg.predict_gradient(h, y)
    p2 = sg.predict_gradient(h, (y + 1) % 4)
    assert np.abs(p1 - p2).max() > 1e-6
    # One-hot encoding: integer labels and their one-hot give the same M.
    p3 = sg.predict_gradient(h, tf.one_hot(y, 4))
    np.testing.assert_allclose(p1, p3, rtol=1e-6)


def test_conditional_layer_in_plain_sequential_fails_clearly():
    model = _conditional_model(cls=keras.Sequential)
    model.compile("adam", "sparse_categorical_crossentropy")
    x = np.zeros((8, D_IN), "float32")
    with pytest.raises(ValueError, match="received no labels.*DNISequential"):
        model.fit(x, np.zeros(8, "int64"), verbose=0)


@pytest.mark.parametrize("solver", ["gradient", "least_squares"])
def test_conditional_float_targets_and_functional_model(solver):
    inputs = keras.Input((D_IN,))
    h = keras_dni.DNIDense(UNITS, conditional=True, name="c", sg_solver=solver)(inputs)
    outputs = keras.layers.Dense(D_OUT)(h)
    model = keras_dni.DNIModel(inputs, outputs)
    model.compile("adam", "mse")
    assert model.get_layer("c").synthetic_gradient.label_dim == D_OUT
    history = model.fit(*_data(), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_validation_logs_leave_out_the_sg_losses():
    # `M` is not trained in evaluation, so `val_sg_loss*` would be a
    # meaningless 0.0.
    x, y = _data()
    model = keras_dni.DNISequential(
        [
            keras.Input((D_IN,)),
            keras_dni.DNIDense(UNITS, activation="relu", name="a"),
            keras.layers.Dense(D_OUT),
        ]
    )
    model.compile("adam", "mse", metrics=["mae"])
    history = model.fit(x, y, batch_size=4, epochs=2, validation_data=(x, y), verbose=0)
    assert {"loss", "mae", "sg_loss", "sg_loss_a", "val_loss", "val_mae"} == set(
        history.history
    )
    assert history.history["sg_loss_a"][-1] > 0.0
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(logs) == {"loss", "mae"}


def test_history_has_per_layer_and_total_sg_loss():
    x, y = _data()
    model = keras_dni.DNISequential(
        [
            keras.Input((D_IN,)),
            keras_dni.DNIDense(UNITS, activation="relu", name="a"),
            keras_dni.DNIDense(UNITS, activation="relu", name="b"),
            keras.layers.Dense(D_OUT),
        ]
    )
    model.compile("adam", "mse", metrics=["mae"])
    history = model.fit(x, y, batch_size=4, epochs=3, verbose=0)
    assert {"loss", "mae", "sg_loss", "sg_loss_a", "sg_loss_b"} <= set(history.history)
    total = np.array(history.history["sg_loss"])
    mean = (
        np.array(history.history["sg_loss_a"]) + np.array(history.history["sg_loss_b"])
    ) / 2
    np.testing.assert_allclose(total, mean, rtol=1e-5)
    # Reset each epoch: epoch values are epoch means, not running totals.
    assert len(set(history.history["sg_loss_b"])) == 3
    # `loss` is tracked like Keras does.
    plain = model.evaluate(x, y, verbose=0, return_dict=True)
    assert "loss" in plain


def test_model_without_dni_layer_is_rejected():
    model = keras_dni.DNISequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="has no DNI layer"):
        model.compile("adam", "mse")


def test_invalid_sg_optimizer():
    model = keras_dni.DNISequential([keras.Input((3,)), keras_dni.DNIDense(2)])
    with pytest.raises(ValueError, match="Could not interpret optimizer"):
        model.compile("adam", "mse", sg_optimizer="no-such-optimizer")


@pytest.mark.parametrize("solver", ["gradient", "least_squares"])
@pytest.mark.parametrize(
    "compile_kwargs",
    [
        {"run_eagerly": True},
        {"jit_compile": False},
        {"jit_compile": True},
        {"steps_per_execution": 3},
    ],
)
def test_execution_modes_agree(compile_kwargs, solver):
    """Eager, graph, XLA and multi-step execution give the same weights."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, D_IN)).astype("float32")
    y = rng.normal(size=(48, D_OUT)).astype("float32")

    def train(**kwargs):
        keras.utils.set_random_seed(0)
        model = keras_dni.DNISequential(
            [
                keras.Input((D_IN,)),
                keras_dni.DNIDense(UNITS, activation="relu", sg_solver=solver),
                keras.layers.Dense(D_OUT),
            ]
        )
        model.compile(keras.optimizers.SGD(0.05), "mse", **kwargs)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        return model.get_weights(), least_squares_weights(model)

    (reference, solved), (weights, _) = (
        train(jit_compile=False),
        train(**compile_kwargs),
    )
    # XLA rounds otherwise: the least-squares M's weights get a tolerance
    # for the ridge solve's amplification of rounding (see helpers).
    assert any(solved) == (solver == "least_squares")
    assert_weights_close(weights, reference, solved, rtol=1e-4, atol=1e-6)


def test_stock_train_step_also_trains_all_modes():
    x, y = _data()
    for kwargs in ({"run_eagerly": True}, {"jit_compile": True}):
        model = keras.Sequential(
            [
                keras.Input((D_IN,)),
                keras_dni.DNIDense(UNITS, activation="relu"),
                keras.layers.Dense(D_OUT),
            ]
        )
        model.compile("adam", "mse", **kwargs)
        history = model.fit(x, y, epochs=2, verbose=0)
        assert np.isfinite(history.history["loss"]).all()


def test_mixed_float16_keeps_gradient_model_in_float32():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = _data()
    model = keras_dni.DNISequential(
        [
            keras.Input((D_IN,)),
            keras_dni.DNIDense(16, activation="relu", name="d"),
            keras.layers.Dense(D_OUT, dtype="float32"),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = model.fit(x, y, epochs=20, verbose=0)
    sg = model.get_layer("d").synthetic_gradient
    assert model.get_layer("d").compute_dtype == "float16"
    assert all(v.dtype == "float32" for v in sg.trainable_variables)
    assert history.history["loss"][-1] < history.history["loss"][0]
    losses = history.history["sg_loss_d"]
    assert np.isfinite(losses).all() and losses[-1] > 0
    # The target is the per-example gradient, free of the loss scale
    # (32768): compare M's loss with the float32 run of the same model.
    keras.config.set_dtype_policy("float32")
    ref = keras_dni.DNISequential(
        [
            keras.Input((D_IN,)),
            keras_dni.DNIDense(16, activation="relu", name="d"),
            keras.layers.Dense(D_OUT),
        ]
    )
    ref.compile(keras.optimizers.Adam(1e-2), "mse")
    ref.set_weights(model.get_weights())
    ref_history = ref.fit(x, y, epochs=1, verbose=0)
    assert losses[-1] < 10 * ref_history.history["sg_loss_d"][0]


def test_mixed_float16_with_stock_train_step_fails_clearly():
    keras.config.set_dtype_policy("mixed_float16")
    model = keras.Sequential(
        [keras.Input((D_IN,)), keras_dni.DNIDense(4), keras.layers.Dense(1)]
    )
    model.compile("adam", "mse")
    with pytest.raises(ValueError, match="loss scale.*DNISequential"):
        model.fit(np.zeros((4, D_IN)), np.zeros((4, 1)), verbose=0)


_MIRRORED = []


def _mirrored_strategy():
    # One instance per process: TensorFlow's collective keys can collide
    # between MirroredStrategy instances created in the same process.
    if not _MIRRORED:
        _MIRRORED.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    return _MIRRORED[0]


@pytest.mark.parametrize("solver", ["gradient", "least_squares"])
@pytest.mark.parametrize("cls", ["stock", "dni"])
def test_mirrored_strategy_matches_single_device(cls, solver):
    """Two replicas with half batches each: same update as one device."""
    assert len(tf.config.list_logical_devices("CPU")) >= 2
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, D_IN)).astype("float32")
    y = rng.normal(size=(32, D_OUT)).astype("float32")
    model_cls = keras.Sequential if cls == "stock" else keras_dni.DNISequential

    def train(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = model_cls(
                [
                    keras.Input((D_IN,)),
                    keras_dni.DNIDense(
                        UNITS, activation="tanh", name="d", sg_solver=solver
                    ),
                    keras.layers.Dense(D_OUT),
                ]
            )
            set_random_gradient_model(model.get_layer("d").synthetic_gradient)
            model.compile(keras.optimizers.SGD(0.1), "mse")
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        return model.get_weights(), history.history, least_squares_weights(model)

    single, h1, solved = train(tf.distribute.OneDeviceStrategy("/cpu:0"))
    mirrored, h2, _ = train(_mirrored_strategy())
    # The all-reduce sums in another order: the least-squares M's weights
    # get a tolerance for the ridge solve's amplification of rounding
    # (see helpers).
    assert any(solved) == (solver == "least_squares")
    assert_weights_close(mirrored, single, solved, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(h1["sg_loss_d"], h2["sg_loss_d"], rtol=1e-4)
