"""SyntheticGradientMonitor and the BP(lambda) callbacks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dni
from keras_dni.callbacks import BPLambdaScheduler
from keras_dni.callbacks import BPLambdaWarmup
from keras_dni.callbacks import SyntheticGradientMonitor

D_IN, D_OUT = 5, 3


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D_IN)).astype("float32")
    y = rng.normal(size=(n, D_OUT)).astype("float32")
    return x, y


def _model(bp_lambda=0.0, solver="auto"):
    kwargs = {"activation": "tanh", "bp_lambda": bp_lambda, "sg_solver": solver}
    return keras_dni.DNISequential(
        [
            keras.Input((D_IN,)),
            keras_dni.DNIDense(6, name="a", **kwargs),
            keras_dni.DNIDense(4, name="b", **kwargs),
            keras.layers.Dense(D_OUT),
        ]
    )


def test_monitor_cosine_is_one_for_backprop():
    x, y = _data()
    model = _model(bp_lambda=1.0)
    model.compile("adam", "mse")
    monitor = SyntheticGradientMonitor(every_n_batches=2)
    history = model.fit(x, y, batch_size=8, epochs=2, callbacks=[monitor], verbose=0)
    for name in ("a", "b"):
        steps = [s for s, _ in monitor.history[f"sg_cosine_{name}"]]
        assert steps == [0, 2, 4, 6]
        np.testing.assert_allclose(
            [v for _, v in monitor.history[f"sg_cosine_{name}"]], 1.0, rtol=1e-5
        )
        np.testing.assert_allclose(
            [v for _, v in monitor.history[f"sg_rel_error_{name}"]], 0.0, atol=1e-5
        )
        assert f"sg_cosine_{name}" in history.history


@pytest.mark.parametrize("solver", ["gradient", "least_squares"])
def test_monitor_matches_independent_computation(solver):
    """Cosine between M's prediction and the true per-example gradient,
    computed here with a plain GradientTape on a copy of the network."""
    x, y = _data(n=16)
    model = _model(solver=solver)
    model.compile(
        keras.optimizers.SGD(0.0), "mse", sg_optimizer=keras.optimizers.Adam(1e-2)
    )
    model.fit(x, y, batch_size=16, epochs=5, verbose=0)  # M is trained
    # Freeze everything, so the weights measured are the weights used below.
    model.compile(
        keras.optimizers.SGD(0.0), "mse", sg_optimizer=keras.optimizers.SGD(0.0)
    )
    a, b = model.get_layer("a"), model.get_layer("b")
    out = model.layers[-1]
    with tf.GradientTape() as tape:
        ha = tf.tanh(x @ a.kernel + a.bias)
        hb = tf.tanh(ha @ b.kernel + b.bias)
        tape.watch([ha, hb])
        loss = tf.reduce_mean(tf.square(hb @ out.kernel + out.bias - y))
    true_a, true_b = tape.gradient(loss, [ha, hb])
    # M's predictions before the step: the monitor measures at its start,
    # and the step refits a least-squares M (whatever the optimizers).
    preds = {
        layer.name: layer.synthetic_gradient.predict_gradient(h).numpy().ravel()
        for layer, h in ((a, ha), (b, hb))
    }
    monitor = SyntheticGradientMonitor(every_n_batches=1)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[monitor], verbose=0)

    for layer, true in ((a, true_a), (b, true_b)):
        pred = preds[layer.name]
        true = true.numpy().ravel() * len(x)
        cosine = pred @ true / (np.linalg.norm(pred) * np.linalg.norm(true))
        rel = np.linalg.norm(pred - true) / np.linalg.norm(true)
        ((_, got_cos),) = monitor.history[f"sg_cosine_{layer.name}"]
        ((_, got_rel),) = monitor.history[f"sg_rel_error_{layer.name}"]
        np.testing.assert_allclose(got_cos, cosine, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got_rel, rel, rtol=1e-4, atol=1e-5)
        assert abs(cosine) < 0.9999  # not trivially 1


def test_monitor_costs_nothing_between_measurements():
    """The measuring branch does not change training."""
    x, y = _data()

    def train(callbacks):
        keras.utils.set_random_seed(3)
        model = _model()
        model.compile(keras.optimizers.SGD(0.1), "mse")
        model.fit(
            x, y, batch_size=8, epochs=2, shuffle=False, callbacks=callbacks, verbose=0
        )
        return model.get_weights()

    for w1, w2 in zip(train([]), train([SyntheticGradientMonitor(3)])):
        np.testing.assert_allclose(w1, w2, rtol=1e-6)


def test_monitor_needs_dni_model():
    model = keras.Sequential([keras.Input((D_IN,)), keras_dni.DNIDense(2)])
    model.compile("adam", "mse")
    with pytest.raises(TypeError, match="needs a `keras_dni.DNISequential`"):
        model.fit(*_data(), callbacks=[SyntheticGradientMonitor(1)], verbose=0)


def test_monitor_argument_error():
    with pytest.raises(ValueError, match="`every_n_batches`.*=0"):
        SyntheticGradientMonitor(every_n_batches=0)


def test_warmup_schedule_sets_every_layer():
    x, y = _data()
    model = _model()
    model.compile("adam", "mse")
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(
                [
                    float(layer.bp_lambda.numpy())
                    for layer in keras_dni.synthetic_gradient_layers(self.model)
                ]
            )

    history = model.fit(
        x, y, epochs=4, verbose=0, callbacks=[BPLambdaWarmup(2), Record()]
    )
    assert seen == [[1.0, 1.0], [0.5, 0.5], [0.0, 0.0], [0.0, 0.0]]
    assert history.history["bp_lambda"] == [1.0, 0.5, 0.0, 0.0]


def test_scheduler_rejects_bad_values():
    model = _model()
    model.compile("adam", "mse")
    with pytest.raises(ValueError, match="bp_lambda.*schedule.*=2"):
        model.fit(*_data(), verbose=0, callbacks=[BPLambdaScheduler(lambda epoch: 2)])
    with pytest.raises(TypeError, match="`schedule`"):
        BPLambdaScheduler(0.5)
    with pytest.raises(ValueError, match="`warmup_epochs`"):
        BPLambdaWarmup(0)
