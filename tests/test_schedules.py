"""compile(schedule=..., stage_devices=..., update_probability=...).

The reference below is written from the paper's definition of the
schedules with plain `tf.GradientTape` and numpy on copies of the weights;
it does not call keras_dni. Model: Input(4) -> DNIDense(5) -> conditional
DNIDense(5) -> Dense(3, softmax), i.e. three stages.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import SnapshotRecorder
from helpers import assert_solution_close
from helpers import set_random_gradient_model

import keras_dni
from keras_dni import schedules
from keras_dni.synthetic_gradient import CALIBRATION_DECAY
from keras_dni.synthetic_gradient import SOLVER_RIDGE

B, D_IN, UNITS, CLASSES = 8, 4, 5, 3
LR, SG_LR = 0.01, 0.02
BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7


def _model(
    cls=keras_dni.DNISequential, regularizer=None, solver="auto", calibration=False
):
    # The reference sends M's prediction unbounded, as the paper does
    # (`prediction_clip` has its own references: test_prediction_clip.py).
    layers = [
        keras_dni.DNIDense(
            UNITS,
            activation="tanh",
            name="d1",
            kernel_regularizer=regularizer,
            sg_solver=solver,
            sg_prediction_clip=None,
            sg_calibration=calibration,
        ),
        keras_dni.DNIDense(
            UNITS,
            activation="tanh",
            conditional=True,
            name="d2",
            sg_solver=solver,
            sg_prediction_clip=None,
        ),
        keras.layers.Dense(CLASSES, activation="softmax", name="out"),
    ]
    if cls is keras_dni.DNISequential:
        return cls([keras.Input((D_IN,))] + layers)
    inputs = keras.Input((D_IN,))
    h = inputs
    for layer in layers:
        h = layer(h)
    return cls(inputs, h)


def _compile(model, optimizer="adam", **kwargs):
    if optimizer == "adam":
        opt, sg_opt = keras.optimizers.Adam(LR), keras.optimizers.Adam(SG_LR)
    else:
        opt, sg_opt = keras.optimizers.SGD(LR), keras.optimizers.SGD(SG_LR)
    model.compile(opt, "sparse_categorical_crossentropy", sg_optimizer=sg_opt, **kwargs)
    # Non-zero gradient models, so that every stage gets a gradient at once.
    for i, name in enumerate(("d1", "d2")):
        set_random_gradient_model(model.get_layer(name).synthetic_gradient, seed=i)
    rng = np.random.default_rng(5)
    labels = model.get_layer("d2").synthetic_gradient._label_projection.kernel
    labels.assign(rng.normal(size=labels.shape).astype("float32") * 0.5)
    return model


def _start_calibration(model, ref, product=0.5, energy=1.0):
    """M1's calibration statistics at a factor of 0.5, in model and `ref`."""
    statistics = model.get_layer("d1").synthetic_gradient._calibration
    statistics.product.assign(product)
    statistics.energy.assign(energy)
    ref.calibration = (product, energy)


def _data(steps=3):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * B, D_IN)).astype("float32")
    # Labels that identify their batch: every label of batch s is s.
    y = np.repeat(np.arange(steps) % CLASSES, B).astype("int64")
    return x, y


# Short names of the variables the reference keeps, and where they live.
def _variables(model):
    d1, d2, out = (model.get_layer(n) for n in ("d1", "d2", "out"))
    m1, m2 = d1.synthetic_gradient, d2.synthetic_gradient
    return {
        "w1": d1.kernel,
        "b1": d1.bias,
        "w2": d2.kernel,
        "b2": d2.bias,
        "w3": out.kernel,
        "b3": out.bias,
        "k1": m1._input_dense.kernel,
        "c1": m1._input_dense.bias,
        "k2": m2._input_dense.kernel,
        "c2": m2._input_dense.bias,
        "l2": m2._label_projection.kernel,
    }


NETWORK = {1: ("w1", "b1"), 2: ("w2", "b2"), 3: ("w3", "b3")}
GRADIENT_MODEL = {1: ("k1", "c1"), 2: ("k2", "c2", "l2")}


def _snapshot(model):
    return {k: v.numpy().copy() for k, v in _variables(model).items()}


def _adam_states(model):
    """{short name: (m, v)} read from both optimizers' variables."""
    states = {}
    for key, var in _variables(model).items():
        prefix = var.path.replace("/", "_")
        for opt in (model.optimizer, model.sg_optimizer):
            found = {
                ov.path.split("/", 1)[1]: ov.numpy()
                for ov in opt.variables
                if ov.path.split("/", 1)[1].startswith(prefix + "_")
            }
            if found:
                states[key] = (found[prefix + "_momentum"], found[prefix + "_velocity"])
    return states


# ------------------------------------------------------------ reference
def _layer_norm(h):
    mean, var = tf.nn.moments(h, axes=[-1], keepdims=True)
    return (h - mean) * tf.math.rsqrt(var + 1e-6)


class Reference:
    """The paper's unlocked schedule, by hand, with Adam by hand.

    Stage 1 runs, is updated from M1(h1); stage 2 runs on the h1 produced
    before that update, is updated from M2(h2, y); its gradient at h1 is
    M1's target; stage 3 computes the loss, is updated, and its gradient at
    h2 is M2's target. Targets and predictions are per-example gradients
    (gradient x batch size); M's loss is the MSE over batch and features.
    Every update of step s uses Adam's step count s + 1; a stage whose
    mask is False changes neither its weights, its M nor their Adam state.

    With `solver="least_squares"` M is not trained by Adam: where it would
    be, it becomes the ridge regression of its target on [layer_norm(h),
    one-hot labels (M2), 1] over exponentially weighted batch moments
    (decay `1 - rows / (2 * regressors)`, clipped to [0.5, 0.999]); the
    conditional M2 then sees the raw h2 (`input_normalization="auto"`).

    With `calibration`, M1 (`sg_calibration=True`) sends its prediction
    times its calibration factor: `<s, g> / <s, s>` clipped to [0, 1], over
    exponentially weighted past batches of its prediction `s` and target
    `g` (whether or not its stage updates), 1 until `s` is nonzero.
    """

    def __init__(self, params, solver="gradient", calibration=False):
        self.p = {k: np.asarray(v, np.float64) for k, v in params.items()}
        self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.t = 0
        self.solver = solver
        self.moments = {1: (0.0, 0.0), 2: (0.0, 0.0)}
        self.calibration = (0.0, 0.0)  # M1's running <s, g> and <s, s>
        self.calibrated = calibration

    def _factor(self):
        product, energy = self.calibration
        if not self.calibrated:
            return 1.0
        return 1.0 if energy <= 0.0 else float(np.clip(product / energy, 0.0, 1.0))

    def _calibrate(self, prediction, target):
        s, g = np.asarray(prediction), np.asarray(target)
        batch_product, batch_energy = np.mean(s * g), np.mean(s * s)
        if batch_energy <= 0.0:
            return
        product, energy = self.calibration
        keep = CALIBRATION_DECAY if energy > 0.0 else 0.0
        self.calibration = (
            keep * product + (1 - keep) * batch_product,
            keep * energy + (1 - keep) * batch_energy,
        )

    def _inputs(self, stage, h):
        """M's input: layer-normalised, but raw for the least-squares M2."""
        if stage == 2 and self.solver == "least_squares":
            return h
        return _layer_norm(h)

    def _adam(self, key, grad, lr):
        grad = np.asarray(grad, np.float64)
        t = self.t + 1
        self.m[key] += (grad - self.m[key]) * (1 - BETA_1)
        self.v[key] += (grad**2 - self.v[key]) * (1 - BETA_2)
        alpha = lr * np.sqrt(1 - BETA_2**t) / (1 - BETA_1**t)
        self.p[key] -= alpha * self.m[key] / (np.sqrt(self.v[key]) + EPSILON)

    def _update(self, keys, grads, lr, on):
        if on:
            for key, grad in zip(keys, grads):
                self._adam(key, grad, lr)

    def _regression(self, keys, h, target, labels=None):
        """Gradient of mean((M(h) - target)^2) w.r.t. M's weights."""
        weights = [tf.constant(self.p[k]) for k in keys]
        with tf.GradientTape() as tape:
            tape.watch(weights)
            pred = _layer_norm(h) @ weights[0] + weights[1]
            if labels is not None:
                pred = pred + labels @ weights[2]
            loss = tf.reduce_mean(tf.square(pred - target))
        return tape.gradient(loss, weights)

    def _fit(self, stage, h, target, labels, on):
        """Least squares: refits M of `stage` on one more batch."""
        if not on:
            return
        parts = [self._inputs(stage, h)] + ([labels] if labels is not None else [])
        z = np.concatenate([np.asarray(t) for t in parts] + [np.ones((B, 1))], 1)
        rows, dim = z.shape
        decay = np.clip(1.0 - rows / (2.0 * dim), 0.5, 0.999)
        gram, cross = self.moments[stage]
        gram = decay * gram + (1 - decay) * z.T @ z / rows
        cross = decay * cross + (1 - decay) * z.T @ np.asarray(target) / rows
        self.moments[stage] = gram, cross
        ridge = SOLVER_RIDGE * np.trace(gram) / dim
        solution = np.linalg.solve(gram + ridge * np.eye(dim), cross)
        kernel, bias, *label_kernel = GRADIENT_MODEL[stage]
        self.p[kernel], self.p[bias] = solution[:UNITS], solution[-1]
        if label_kernel:
            self.p[label_kernel[0]] = solution[UNITS:-1]

    def _train_gradient_model(self, stage, h, target, labels, on):
        if self.solver == "least_squares":
            self._fit(stage, h, target, labels, on)
            return
        grads = self._regression(GRADIENT_MODEL[stage], h, target, labels)
        self._update(GRADIENT_MODEL[stage], grads, SG_LR, on)

    def step(self, x, y, masks=(True, True, True)):
        c = {k: tf.constant(v) for k, v in self.p.items()}
        x = tf.constant(x, tf.float64)
        onehot = tf.one_hot(y, CLASSES, dtype=tf.float64)
        # Stage 1: forward, update from M1(h1).
        with tf.GradientTape() as tape:
            tape.watch([c["w1"], c["b1"]])
            h1 = tf.tanh(x @ c["w1"] + c["b1"])
        p1 = self._inputs(1, h1) @ c["k1"] + c["c1"]
        sent = self._factor() * p1
        grads = tape.gradient(h1, [c["w1"], c["b1"]], output_gradients=sent / B)
        self._update(NETWORK[1], grads, LR, masks[0])
        # Stage 2: on the h1 stage 1 produced; update from M2(h2, y).
        with tf.GradientTape() as tape:
            tape.watch([c["w2"], c["b2"], h1])
            h2 = tf.tanh(h1 @ c["w2"] + c["b2"])
        p2 = self._inputs(2, h2) @ c["k2"] + c["c2"] + onehot @ c["l2"]
        *grads, dh1 = tape.gradient(h2, [c["w2"], c["b2"], h1], output_gradients=p2 / B)
        self._update(NETWORK[2], grads, LR, masks[1])
        self._train_gradient_model(1, h1, dh1 * B, None, masks[0])
        self._calibrate(p1, dh1 * B)
        # Stage 3: the loss.
        with tf.GradientTape() as tape:
            tape.watch([c["w3"], c["b3"], h2])
            probs = tf.nn.softmax(h2 @ c["w3"] + c["b3"])
            loss = -tf.reduce_mean(tf.reduce_sum(onehot * tf.math.log(probs), -1))
        *grads, dh2 = tape.gradient(loss, [c["w3"], c["b3"], h2])
        self._update(NETWORK[3], grads, LR, masks[2])
        self._train_gradient_model(2, h2, dh2 * B, onehot, masks[1])
        self.t += 1


def _assert_matches(model, ref, steps):
    got = _snapshot(model)
    states = _adam_states(model)
    if ref.solver == "least_squares":
        # Fitted, not trained: no optimizer state, and the ridge solve's
        # tolerance for float32 against the float64 reference (helpers),
        # on each M's whole solution [kernel; label kernel; bias].
        fitted = {k for keys in GRADIENT_MODEL.values() for k in keys}
        assert set(states) == set(got) - fitted
        for keys in GRADIENT_MODEL.values():
            kernel, bias, *label_kernel = keys
            order = [kernel, *label_kernel]
            stacked = [
                np.concatenate([w[k] for k in order] + [w[bias][None]])
                for w in (got, ref.p)
            ]
            assert_solution_close(*stacked, err_msg=str(keys))
        got = {k: v for k, v in got.items() if k not in fitted}
    for key in got:
        # The network's gradients come from M's predictions: with least
        # squares those carry the solve's rounding, bounded relative to the
        # whole array, not per entry.
        values = ((got[key], ref.p[key], 2e-6, ""),)
        values += ((states[key][0], ref.m[key], 2e-7, " m"),)
        values += ((states[key][1], ref.v[key], 1e-9, " v"),)
        for actual, desired, atol, what in values:
            if ref.solver == "least_squares":
                atol = max(atol, 2e-4 * np.abs(desired).max())
            np.testing.assert_allclose(
                actual, desired, rtol=2e-4, atol=atol, err_msg=key + what
            )
    # One increment per step, not per stage.
    assert int(model.optimizer.iterations.numpy()) == steps
    if ref.solver == "gradient":
        assert int(model.sg_optimizer.iterations.numpy()) == steps


# ----------------------------------------------------------------- tests
@pytest.mark.parametrize("calibration", [False, True])
@pytest.mark.parametrize("solver", ["gradient", "least_squares"])
@pytest.mark.parametrize("schedule", ["unlocked", "locked"])
def test_weights_and_adam_states_match_hand_written_reference(
    schedule, solver, calibration
):
    """Unlocked (and locked: the same updates, one pass) == the paper's
    schedule by hand; conditional M2 sees the labels of its own batch."""
    x, y = _data()
    model = _compile(_model(solver=solver, calibration=calibration), schedule=schedule)
    ref = Reference(_snapshot(model), solver, calibration)
    if calibration:
        _start_calibration(model, ref)
    for s in range(3):
        ref.step(x[s * B : (s + 1) * B], y[s * B : (s + 1) * B])
    model.fit(x, y, batch_size=B, shuffle=False, verbose=0)
    _assert_matches(model, ref, 3)
    if calibration:  # the factor was in use, strictly inside its bounds
        assert 0.0 < ref._factor() < 1.0, ref.calibration


def test_unlocked_equals_locked_functional_and_regularized():
    """A DNIModel chain, with a kernel regularizer in stage 1 (its term is
    part of stage 1's objective): unlocked gives locked's updates."""
    x, y = _data()
    results = []
    for schedule in ("locked", "unlocked"):
        keras.utils.set_random_seed(3)
        model = _compile(
            _model(keras_dni.DNIModel, keras.regularizers.L2(0.1)),
            optimizer="sgd",
            schedule=schedule,
        )
        history = model.fit(x, y, batch_size=B, shuffle=False, verbose=0)
        results.append((_snapshot(model), history.history))
    (locked, h_locked), (unlocked, h_unlocked) = results
    for key in locked:
        np.testing.assert_allclose(unlocked[key], locked[key], rtol=1e-6, err_msg=key)
    for key in ("sg_loss_d1", "sg_loss_d2"):
        np.testing.assert_allclose(h_unlocked[key], h_locked[key], rtol=1e-5)


@pytest.mark.parametrize("schedule", ["locked", "unlocked", "pipelined"])
@pytest.mark.parametrize("solver", ["least_squares", "gradient"])
def test_both_optimizers_count_one_iteration_per_step(schedule, solver):
    # Also when every M is refitted by least squares (`sg_optimizer` then
    # updates nothing): the count is the step count under every schedule.
    steps = 4
    x, y = _data(steps)
    keras.utils.set_random_seed(0)
    model = _compile(_model(solver=solver), schedule=schedule)
    model.fit(x, y, batch_size=B, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == steps
    assert int(model.sg_optimizer.iterations.numpy()) == steps


def test_update_probability_one_is_the_default():
    x, y = _data()
    results = []
    for kwargs in ({}, {"update_probability": 1.0}):
        keras.utils.set_random_seed(3)
        model = _compile(_model(), schedule="unlocked", **kwargs)
        model.fit(x, y, batch_size=B, shuffle=False, verbose=0)
        results.append(_snapshot(model))
    for key in results[0]:
        np.testing.assert_array_equal(results[0][key], results[1][key])


@pytest.mark.parametrize("solver", ["gradient", "least_squares"])
@pytest.mark.parametrize("schedule", ["unlocked", "locked"])
def test_update_probability_skips_stages_and_matches_reference(schedule, solver):
    """p = 0.5: per step, a stage's weights and its M either all change or
    all stay exactly; the reference with the same masks gives the same
    weights and Adam states; the draws are reproducible."""
    steps = 6
    x, y = _data(steps)
    runs = []
    for _ in range(2):
        keras.utils.set_random_seed(11)
        model = _compile(
            _model(solver=solver), schedule=schedule, update_probability=0.5
        )
        recorder = SnapshotRecorder(_snapshot)
        model.fit(x, y, batch_size=B, shuffle=False, verbose=0, callbacks=[recorder])
        runs.append((model, recorder.snapshots))
    (model, snaps), (_, snaps_again) = runs
    for a, b in zip(snaps, snaps_again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])

    masks = []
    for before, after in zip(snaps[:-1], snaps[1:]):
        step_masks = []
        for stage in (1, 2, 3):
            keys = NETWORK[stage] + GRADIENT_MODEL.get(stage, ())
            changed = [not np.array_equal(before[k], after[k]) for k in keys]
            assert all(changed) or not any(changed), (stage, changed)
            step_masks.append(changed[0])
        masks.append(tuple(step_masks))
    flat = [m for step in masks for m in step]
    assert any(flat) and not all(flat), masks

    ref = Reference(snaps[0], solver)
    for s in range(steps):
        ref.step(x[s * B : (s + 1) * B], y[s * B : (s + 1) * B], masks[s])
    _assert_matches(model, ref, steps)


@pytest.mark.parametrize(
    "cls, schedule",
    [
        (keras_dni.DNISequential, "locked"),
        (keras_dni.DNISequential, "unlocked"),
        (keras_dni.DNIModel, "unlocked"),
    ],
)
def test_fit_evaluate_predict(cls, schedule):
    x, y = _data()
    model = _model(cls)
    kwargs = {"update_probability": 0.7}
    if schedule == "unlocked":
        kwargs["stage_devices"] = ["/cpu:0", "/cpu:1", "/cpu:0"]
    model.compile(
        "adam",
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        schedule=schedule,
        **kwargs,
    )
    history = model.fit(x, y, batch_size=B, epochs=2, verbose=0)
    assert {"loss", "accuracy", "sg_loss", "sg_loss_d1", "sg_loss_d2"} <= set(
        history.history
    )
    assert np.all(np.isfinite(history.history["loss"]))
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(logs) == {"loss", "accuracy"}
    assert model.predict(x, verbose=0).shape == (len(x), CLASSES)


def test_compile_config_round_trip(tmp_path, monkeypatch):
    x, y = _data()
    model = _compile(
        _model(),
        schedule="unlocked",
        stage_devices=["/cpu:0", "/cpu:1", "/cpu:0"],
        update_probability=0.5,
    )
    model.fit(x, y, batch_size=B, verbose=0)
    config = model.get_compile_config()
    assert config["schedule"] == "unlocked"
    assert config["stage_devices"] == ["/cpu:0", "/cpu:1", "/cpu:0"]
    assert config["update_probability"] == 0.5
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)

    calls = []
    step = schedules.unlocked_train_step

    def counting(*args, **kwargs):
        calls.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(schedules, "unlocked_train_step", counting)
    loaded = keras.models.load_model(path)
    assert loaded.get_compile_config()["schedule"] == "unlocked"
    assert loaded._dni_schedule.config() == model._dni_schedule.config()
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model.sg_optimizer.variables, loaded.sg_optimizer.variables):
        np.testing.assert_array_equal(a, b)
    loaded.fit(x, y, batch_size=B, verbose=0)
    assert calls  # the loaded model trained with the unlocked step
    assert int(loaded.optimizer.iterations.numpy()) == 6


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"schedule": "async"}, ValueError, "`schedule`.*'locked', 'unlocked'"),
        ({"update_probability": 0.0}, ValueError, "`update_probability`"),
        ({"update_probability": 1.5}, ValueError, "`update_probability`"),
        ({"update_probability": "0.5"}, TypeError, "`update_probability`"),
        ({"stage_devices": "/cpu:0", "schedule": "unlocked"}, TypeError, "stage_"),
        ({"stage_devices": ["/cpu:0"] * 3}, ValueError, "`stage_devices`.*locked"),
        (
            {"stage_devices": ["/cpu:0"] * 2, "schedule": "unlocked"},
            ValueError,
            "`stage_devices`.*3 stages",
        ),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _model().compile("adam", "sparse_categorical_crossentropy", **kwargs)


def test_unlocked_needs_bp_lambda_zero_and_no_loss_scaling():
    model = keras_dni.DNISequential(
        [keras.Input((D_IN,)), keras_dni.DNIDense(4, bp_lambda=0.5, name="mix")]
    )
    with pytest.raises(ValueError, match="'mix' has bp_lambda=0.5"):
        model.compile("adam", "mse", schedule="unlocked")
    with pytest.raises(ValueError, match="Loss scaling"):
        _model().compile(
            keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()),
            "mse",
            update_probability=0.5,
        )


def test_functional_model_that_is_not_a_chain_names_the_layer():
    inputs = keras.Input((D_IN,))
    h = keras_dni.DNIDense(UNITS, name="d1")(inputs)
    skip = keras.layers.Concatenate(name="skip")([h, inputs])
    outputs = keras.layers.Dense(CLASSES, name="out")(skip)
    model = keras_dni.DNIModel(inputs, outputs)
    with pytest.raises(ValueError, match="layer 'skip' reads tensors of different"):
        model.compile("adam", "mse", schedule="unlocked")


def test_layer_with_an_inner_decoupling_point_is_refused():
    model = keras_dni.DNISequential(
        [
            keras.Input((6, 3)),
            keras_dni.DNIRNN(keras.layers.SimpleRNNCell(4), truncation=2, name="rnn"),
            keras.layers.Dense(2),
        ]
    )
    with pytest.raises(ValueError, match="layer 'rnn' \\(DNIRNN\\) holds"):
        model.compile("adam", "mse", update_probability=0.5)
    model.compile("adam", "mse")  # locked, p = 1: supported as before
