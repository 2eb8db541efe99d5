"""The least-squares gradient model (`solver`), against numpy.

The reference re-implements the solver from its definition: `M` is the
ridge regression of the per-example gradient at `h` on `[h, one-hot
labels, 1]` (`h` layer-normalised where `input_normalization` says so), over
exponentially weighted batch moments.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dni
from keras_dni.synthetic_gradient import SOLVER_RIDGE

WIDTH, CLASSES, BATCH = 6, 3, 8


def _layer_norm(h):
    mean = h.mean(axis=-1, keepdims=True)
    var = h.var(axis=-1, keepdims=True)
    return (h - mean) / np.sqrt(var + 1e-6)


def _data(steps, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps * BATCH, 4)).astype("float32")
    # Labels that identify their batch: batch k has every label == k % 3,
    # so a solver fed another batch's labels would give other weights.
    y = np.repeat(np.arange(steps) % CLASSES, BATCH).astype("int64")
    return x, y


def _model(cls, decay, conditional, normalization="auto", ridge=SOLVER_RIDGE):
    keras.utils.set_random_seed(1)
    sg = keras_dni.SyntheticGradient(
        conditional=conditional,
        input_normalization=normalization,
        label_dim=CLASSES if conditional else None,
        solver="least_squares",
        solver_decay=decay,
        solver_ridge=ridge,
        name="sg",
    )
    model = cls(
        [
            keras.Input((4,)),
            keras.layers.Dense(WIDTH, activation="tanh", name="below"),
            sg,
            keras.layers.Dense(CLASSES, activation="softmax", name="above"),
        ]
    )
    # A zero learning rate keeps the network fixed, so the targets of every
    # step can be computed from the initial weights.
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    return model, sg


def _reference(model, x, y, decay, conditional, normalize=False, ridge=SOLVER_RIDGE):
    """`M`'s weights after one pass over `(x, y)` in batches, by numpy."""
    below, above = model.get_layer("below"), model.get_layer("above")
    gram = cross = 0.0
    for start in range(0, len(x), BATCH):
        xb, yb = x[start : start + BATCH], y[start : start + BATCH]
        h = tf.constant(below(xb).numpy())
        with tf.GradientTape() as tape:
            tape.watch(h)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(yb, above(h))
            )
        target = tape.gradient(loss, h).numpy() * len(xb)  # per example
        parts = [_layer_norm(h.numpy()) if normalize else h.numpy()]
        if conditional:
            parts.append(np.eye(CLASSES)[yb])
        parts.append(np.ones((len(xb), 1)))
        z = np.concatenate(parts, axis=1).astype("float64")
        dim = z.shape[1]
        step_decay = (
            np.clip(1.0 - len(xb) / (2.0 * dim), 0.5, 0.999)
            if decay == "auto"
            else decay
        )
        gram = step_decay * gram + (1 - step_decay) * z.T @ z / len(xb)
        cross = step_decay * cross + (1 - step_decay) * z.T @ target / len(xb)
    shift = ridge * np.trace(gram) / dim  # relative to the mean eigenvalue
    return np.linalg.solve(gram + shift * np.eye(dim), cross)


def _weights(sg):
    """`M`'s weights as one matrix, rows in the reference's order."""
    parts = [sg._input_dense.kernel.numpy()]
    if sg.conditional:
        parts.append(sg._label_projection.kernel.numpy())
    parts.append(sg._input_dense.bias.numpy()[None])
    return np.concatenate(parts, axis=0)


@pytest.mark.parametrize(
    "cls, decay, conditional, normalization, ridge",
    [
        # stock train_step: fitted in the backward pass
        (keras.Sequential, 0.7, False, "auto", SOLVER_RIDGE),
        # fitted by the DNI train_step
        (keras_dni.DNISequential, 0.7, False, "auto", SOLVER_RIDGE),
        # cDNI, per-batch labels
        (keras_dni.DNISequential, "auto", True, "auto", SOLVER_RIDGE),
        # cDNI on layer-normalised h, plain DNI on raw h
        (keras_dni.DNISequential, 0.7, True, "layer", SOLVER_RIDGE),
        (keras_dni.DNISequential, 0.7, False, None, SOLVER_RIDGE),
        # a stronger ridge (`solver_ridge`)
        (keras_dni.DNISequential, "auto", True, "auto", 0.3),
    ],
)
def test_least_squares_matches_numpy_ridge_regression(
    cls, decay, conditional, normalization, ridge
):
    x, y = _data(steps=3)
    model, sg = _model(cls, decay, conditional, normalization, ridge)
    model.build((None, 4))
    expected = _reference(
        model,
        x,
        y,
        decay,
        conditional,
        normalize=normalization == "layer"
        or (normalization == "auto" and not conditional),
        ridge=ridge,
    )
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(_weights(sg), expected, rtol=2e-3, atol=2e-5)


def test_least_squares_prediction_is_the_fitted_linear_map():
    x, y = _data(steps=2)
    model, sg = _model(keras_dni.DNISequential, 0.5, True)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    h = model.get_layer("below")(x[:BATCH]).numpy()
    z = np.concatenate([h, np.eye(CLASSES)[y[:BATCH]], np.ones((BATCH, 1))], axis=1)
    np.testing.assert_allclose(
        sg.predict_gradient(h, y[:BATCH]).numpy(),
        z @ _weights(sg),
        rtol=1e-4,
        atol=1e-6,
    )


def test_least_squares_sends_its_prediction_below():
    # One step: the layer below is updated from M's prediction before the
    # refit (zero at the first step, so it does not move).
    x, y = _data(steps=1)
    model, _ = _model(keras_dni.DNISequential, 0.5, False)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    model.build((None, 4))
    before = model.get_layer("below").kernel.numpy().copy()
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    np.testing.assert_array_equal(model.get_layer("below").kernel.numpy(), before)
    assert np.abs(model.get_layer("above").kernel.numpy()).sum() > 0


def test_auto_solver():
    dense = keras_dni.SyntheticGradient()
    dense.build((None, 8))
    assert dense.least_squares
    assert not dense.trainable_weights  # M is fitted, not trained
    hidden = keras_dni.SyntheticGradient(hidden_units=(8,))
    hidden.build((None, 8))
    assert not hidden.least_squares
    assert hidden.trainable_weights
    conv3 = keras_dni.SyntheticGradient(kernel_size=3)
    conv3.build((None, 4, 4, 2))
    assert not conv3.least_squares
    gradient = keras_dni.SyntheticGradient(solver="gradient")
    gradient.build((None, 8))
    assert not gradient.least_squares


@pytest.mark.parametrize(
    "kwargs, normalized",
    [
        ({"conditional": True}, False),  # cDNI, least squares: raw h
        ({}, True),  # plain DNI, least squares
        ({"conditional": True, "solver": "gradient"}, True),  # by an optimizer
        ({"conditional": True, "input_normalization": "layer"}, True),
        ({"solver": "gradient", "input_normalization": None}, False),
    ],
)
def test_auto_input_normalization(kwargs, normalized):
    sg = keras_dni.SyntheticGradient(label_dim=CLASSES, **kwargs)
    sg.build((None, WIDTH))
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(WIDTH, WIDTH)).astype("float32")
    bias = rng.normal(size=(WIDTH,)).astype("float32")
    sg._input_dense.kernel.assign(kernel)
    sg._input_dense.bias.assign(bias)
    h = rng.normal(loc=2.0, scale=3.0, size=(5, WIDTH)).astype("float32")
    labels = np.arange(5) % CLASSES
    expected = (_layer_norm(h) if normalized else h) @ kernel + bias
    if sg.conditional:
        projection = rng.normal(size=(CLASSES, WIDTH)).astype("float32")
        sg._label_projection.kernel.assign(projection)
        expected += np.eye(CLASSES)[labels] @ projection
    np.testing.assert_allclose(
        sg.predict_gradient(h, labels).numpy(), expected, rtol=1e-4, atol=1e-4
    )


def test_recurrent_gradient_model_keeps_the_optimizer():
    layer = keras_dni.DNIRNN(keras.layers.LSTMCell(4), truncation=2)
    assert layer.synthetic_gradient.solver == "gradient"


def test_solver_config_round_trip():
    layer = keras_dni.DNIDense(
        4, sg_solver="least_squares", sg_solver_decay=0.25, sg_solver_ridge=0.05
    )
    config = layer.get_config()
    assert config["sg_solver"] == "least_squares"
    assert config["sg_solver_decay"] == 0.25
    assert config["sg_solver_ridge"] == 0.05
    again = keras_dni.DNIDense.from_config(config)
    assert again.synthetic_gradient.solver == "least_squares"
    assert again.synthetic_gradient.solver_decay == 0.25
    assert again.synthetic_gradient.solver_ridge == 0.05
    # A config saved before `solver_ridge` existed gets the default.
    del config["sg_solver_ridge"]
    old = keras_dni.DNIDense.from_config(config)
    assert old.synthetic_gradient.solver_ridge == SOLVER_RIDGE
    conv = keras_dni.DNIConv2D(2, 3, sg_solver_ridge=0.5)
    assert (
        keras_dni.DNIConv2D.from_config(
            conv.get_config()
        ).synthetic_gradient.solver_ridge
        == 0.5
    )
    sg = keras_dni.SyntheticGradient(solver="gradient", solver_decay="auto")
    assert keras_dni.SyntheticGradient.from_config(sg.get_config()).solver == (
        "gradient"
    )


def test_solver_state_is_saved(tmp_path):
    x, y = _data(steps=2)
    model, sg = _model(keras_dni.DNISequential, 0.5, True)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    restored_sg = restored.get_layer("sg")
    np.testing.assert_array_equal(
        restored_sg._solver_state.gram.numpy(), sg._solver_state.gram.numpy()
    )
    np.testing.assert_array_equal(_weights(restored_sg), _weights(sg))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"solver": "adam"}, ValueError, "Received: solver='adam'"),
        ({"solver_decay": 1.0}, ValueError, "Received: solver_decay=1.0"),
        ({"solver_decay": "fast"}, TypeError, "Received: solver_decay='fast'"),
        ({"solver_ridge": 0.0}, ValueError, "Received: solver_ridge=0.0"),
        ({"solver_ridge": float("inf")}, ValueError, "Received: solver_ridge=inf"),
        ({"solver_ridge": "big"}, TypeError, "Received: solver_ridge='big'"),
        ({"solver_ridge": True}, TypeError, "Received: solver_ridge=True"),
        (
            {"solver": "least_squares", "hidden_units": (8,)},
            ValueError,
            "needs `hidden_units=\\(\\)`",
        ),
    ],
)
def test_solver_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_dni.SyntheticGradient(**kwargs)


def test_dni_layer_solver_argument_errors():
    with pytest.raises(ValueError, match="Received: sg_solver='lsq'"):
        keras_dni.DNIDense(4, sg_solver="lsq")
    with pytest.raises(ValueError, match="sg_solver_decay=-0.5"):
        keras_dni.DNIDense(4, sg_solver_decay=-0.5)
    with pytest.raises(ValueError, match="Received: sg_solver_ridge=-1"):
        keras_dni.DNIDense(4, sg_solver_ridge=-1)
    with pytest.raises(TypeError, match="Received: sg_solver_ridge=None"):
        keras_dni.DNIConv2D(2, 3, sg_solver_ridge=None)


def test_least_squares_needs_a_per_position_convolution():
    layer = keras_dni.SyntheticGradient(solver="least_squares", kernel_size=3)
    with pytest.raises(ValueError, match="Received: kernel_size=3"):
        layer.build((None, 4, 4, 2))


def test_conditional_float_targets_with_a_short_last_batch():
    # Float targets (e.g. binary addition's bits) and an unknown batch size
    # in the traced step (10 examples, batch 4): the regressors keep a
    # static width.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 4)).astype("float32")
    y = (rng.random((10, 3)) > 0.5).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras_dni.DNISequential(
        [
            keras.Input((4,)),
            keras_dni.DNIDense(WIDTH, activation="relu", conditional=True, name="c"),
            keras.layers.Dense(3, activation="sigmoid"),
        ]
    )
    model.compile("adam", "binary_crossentropy")
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    sg = model.get_layer("c").synthetic_gradient
    assert sg.least_squares
    assert np.abs(sg._label_projection.kernel.numpy()).sum() > 0


def test_unlocked_equals_locked_with_least_squares_and_skipped_stages():
    # Within one synchronous step every gradient comes from the weights at
    # the start of the step, so the schedules differ only in the order of
    # the work; with the same draws, skipped stages included.
    x, y = _data(steps=4)
    weights = {}
    for schedule in ("locked", "unlocked"):
        keras.utils.set_random_seed(0)
        model = keras_dni.DNISequential(
            [
                keras.Input((4,)),
                keras_dni.DNIDense(WIDTH, activation="relu", conditional=True),
                keras_dni.DNIDense(WIDTH, activation="relu", conditional=True),
                keras.layers.Dense(CLASSES, activation="softmax"),
            ]
        )
        model.compile(
            keras.optimizers.Adam(1e-2),
            "sparse_categorical_crossentropy",
            schedule=schedule,
            update_probability=0.5,
        )
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        weights[schedule] = model.get_weights()
    for locked, unlocked in zip(weights["locked"], weights["unlocked"]):
        np.testing.assert_allclose(unlocked, locked, rtol=1e-6, atol=1e-7)
