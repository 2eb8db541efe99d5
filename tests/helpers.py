"""Independent reference computations for the tests (numpy / GradientTape)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dni
from keras_dni.synthetic_gradient import SOLVER_RIDGE


def set_linear_gradient_model(sg, rng, bias_scale=1.0):
    """Gives `sg`'s linear `M` weights drawn from `rng`; returns them."""
    kernel = rng.normal(size=sg._input_dense.kernel.shape).astype("float32")
    bias = rng.normal(size=sg._input_dense.bias.shape) * bias_scale
    bias = bias.astype("float32")
    sg._input_dense.kernel.assign(kernel)
    sg._input_dense.bias.assign(bias)
    return kernel, bias


def sent_below(sg, h, upstream=None):
    """The gradient that `sg` sends below `h`, with `upstream` from above
    (zeros by default), in one training call outside any model."""
    h = tf.constant(h)
    with tf.GradientTape() as tape:
        tape.watch(h)
        out = sg(h, training=True)
    if upstream is None:
        upstream = np.zeros(h.shape, "float32")
    return tape.gradient(out, h, output_gradients=tf.constant(upstream)).numpy()


def one_dni_layer_model(
    schedule, learning_rate, units, sg_optimizer=None, **dni_kwargs
):
    """Input(4) -> linear DNIDense("d", `M` trained by `sg_optimizer` on the
    raw h, `dni_kwargs`) -> Dense(2, "top"); MSE, SGD(`learning_rate`)."""
    model = keras_dni.DNISequential(
        [
            keras.Input((4,)),
            keras_dni.DNIDense(
                units,
                name="d",
                sg_solver="gradient",
                sg_input_normalization=None,
                **dni_kwargs,
            ),
            keras.layers.Dense(2, name="top"),
        ]
    )
    model.compile(
        keras.optimizers.SGD(learning_rate),
        "mse",
        schedule=schedule,
        sg_optimizer=sg_optimizer,
    )
    return model


def assert_sgd_update(layer, w0, b0, x, sent, learning_rate):
    """`layer` (linear, input `x`) after one SGD step from `sent`, the
    per-example gradient at its output, by hand."""
    batch = len(x)
    np.testing.assert_allclose(
        layer.kernel.numpy(),
        w0 - learning_rate * x.T @ sent / batch,
        rtol=1e-4,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        layer.bias.numpy(),
        b0 - learning_rate * sent.mean(axis=0),
        rtol=1e-4,
        atol=1e-6,
    )


def assert_argument_rejected(argument, value, error):
    """`SyntheticGradient(argument=value)` and `DNIDense(sg_<argument>=value)`
    both raise `error`, naming the argument and the value received."""
    with pytest.raises(error, match=f"Received: {argument}={value!r}"):
        keras_dni.SyntheticGradient(**{argument: value})
    with pytest.raises(error, match=f"Received: sg_{argument}={value!r}"):
        keras_dni.DNIDense(4, **{f"sg_{argument}": value})


def small_dni_model(**dni_kwargs):
    """Input(4) -> DNIDense(8, relu, "d", `dni_kwargs`) -> Dense(2); MSE,
    Adam; after `set_random_seed(0)`."""
    keras.utils.set_random_seed(0)
    model = keras_dni.DNISequential(
        [
            keras.Input((4,)),
            keras_dni.DNIDense(8, activation="relu", name="d", **dni_kwargs),
            keras.layers.Dense(2),
        ]
    )
    model.compile("adam", "mse")
    return model


class SnapshotRecorder(keras.callbacks.Callback):
    """`snapshot(model)` before the first training batch and after each."""

    def __init__(self, snapshot):
        super().__init__()
        self.snapshot = snapshot
        self.snapshots = []

    def on_train_batch_begin(self, batch, logs=None):
        if not self.snapshots:
            self.snapshots.append(self.snapshot(self.model))

    def on_train_batch_end(self, batch, logs=None):
        self.snapshots.append(self.snapshot(self.model))


def check_loads_without(model, build, path, entry):
    """`model`'s weights, saved to `path` without the `entry` sublayers (as
    a file written before they existed), load into `build()`: every other
    weight as saved, those of `entry` at zero."""
    import h5py

    model.save_weights(path)
    with h5py.File(path, "r+") as f:
        names = []
        f.visit(lambda name: names.append(name) if name.endswith(entry) else None)
        assert names
        for name in names:
            del f[name]
    fresh = build()
    fresh.load_weights(path)
    for saved, loaded in zip(model.weights, fresh.weights):
        if f"/{entry}/" in saved.path:
            assert loaded.numpy() == 0.0
        else:
            np.testing.assert_array_equal(
                loaded.numpy(), saved.numpy(), err_msg=saved.path
            )


def layer_norm(h):
    """The parameter-free layer norm of the gradient model's input (numpy)."""
    h = np.asarray(h, dtype=np.float64)
    mean = h.mean(-1, keepdims=True)
    var = h.var(-1, keepdims=True)
    return (h - mean) / np.sqrt(var + 1e-6)


def set_random_gradient_model(sg_layer, seed=0, scale=0.5):
    """Gives a linear gradient model random weights; returns (kernel, bias)."""
    rng = np.random.default_rng(seed)
    dense = sg_layer._input_dense
    kernel = rng.normal(size=dense.kernel.shape).astype("float32") * scale
    bias = rng.normal(size=dense.bias.shape).astype("float32") * scale
    dense.kernel.assign(kernel)
    dense.bias.assign(bias)
    return kernel, bias


def linear_prediction(h, kernel, bias, labels=None, label_kernel=None):
    """Linear gradient model by hand: layer_norm(h) @ kernel + bias."""
    out = layer_norm(h) @ kernel + bias
    if label_kernel is not None:
        out = out + labels @ label_kernel
    return out.astype("float32")


def mse_loss(y_true, y_pred):
    return tf.reduce_mean(tf.square(y_pred - y_true))


# The least-squares solver's ridge solve amplifies float32 rounding
# differences of its inputs (another reduction order: XLA against the TF
# kernels, two replicas' all-reduce against one sum) by up to the condition
# number of its regularised Gram matrix, about 1 / SOLVER_RIDGE = 1e3: a
# relative 1e-7 .. 1e-6 becomes up to ~1e-4 .. 1e-3, measured against the
# whole solution (the bound is norm-wise, not per entry). Measured: 4e-5
# (XLA, MirroredStrategy) with SOLVER_RIDGE = 1e-3, 2e-6 with 1e-2, 4e-7
# with 1e-1: the gap follows the conditioning, so it is rounding, not a
# difference of computation.
LEAST_SQUARES_RTOL = 2e-3


def ridge_solution(z, target):
    """`M` after its first least-squares fit (zero moments), by numpy.

    `z`: the regressors, one row per example (and position); `target`: the
    per-example gradient, same rows. From zero moments the decay cancels.
    """
    z = np.asarray(z, np.float64)
    target = np.asarray(target, np.float64).reshape(len(z), -1)
    gram, cross = z.T @ z / len(z), z.T @ target / len(z)
    dim = z.shape[1]
    ridge = SOLVER_RIDGE * np.trace(gram) / dim
    return np.linalg.solve(gram + ridge * np.eye(dim), cross)


def least_squares_weights(model):
    """Per entry of `model.weights`: whether it belongs to a least-squares
    gradient model (its weights or its solver state)."""
    ids = set()
    for layer in keras_dni.synthetic_gradient_layers(model):
        if layer.least_squares:
            ids.update(id(w) for w in layer.weights)
    return [id(w) in ids for w in model.weights]


def assert_solution_close(actual, desired, err_msg=""):
    """`assert_allclose` within `LEAST_SQUARES_RTOL` of the largest entry
    (compare a least-squares M's whole solution, [kernel; bias], at once)."""
    desired = np.asarray(desired)
    scale = float(np.abs(desired).max()) if desired.size else 0.0
    np.testing.assert_allclose(
        actual,
        desired,
        rtol=LEAST_SQUARES_RTOL,
        atol=LEAST_SQUARES_RTOL * scale,
        err_msg=err_msg,
    )


def assert_weights_close(actual, desired, least_squares, rtol, atol):
    """`assert_allclose` per weight; `assert_solution_close` for the weights
    of least-squares gradient models."""
    for i, (a, d, solved) in enumerate(zip(actual, desired, least_squares)):
        if solved:
            assert_solution_close(a, d, err_msg=f"weight {i}")
        else:
            np.testing.assert_allclose(
                a, d, rtol=rtol, atol=atol, err_msg=f"weight {i}"
            )
