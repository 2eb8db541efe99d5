"""compile(schedule="pipelined"): every stage at once, each on its own batch.

The reference is written from the schedule's definition with plain
`tf.GradientTape` and numpy (the hand-written Adam, layer norm and least
squares of `test_schedules.Reference`); it does not call keras_dni. Model:
Input(4) -> DNIDense(5) -> conditional DNIDense(5) -> Dense(3, softmax),
three stages; the labels of batch s are s % 3, so a stage that used the
labels of another batch than the one that produced its activation would
give other weights.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import SnapshotRecorder
from test_schedules import CLASSES
from test_schedules import GRADIENT_MODEL
from test_schedules import LR
from test_schedules import NETWORK
from test_schedules import SG_LR
from test_schedules import B
from test_schedules import Reference
from test_schedules import _assert_matches
from test_schedules import _compile
from test_schedules import _data
from test_schedules import _model
from test_schedules import _snapshot
from test_schedules import _start_calibration

import keras_dni


class PipelinedReference(Reference):
    """The pipelined schedule by hand.

    In step t, stage 1 runs on batch t, stage 2 on the h1 that stage 1
    produced in step t - 1 (with batch t - 1's labels), stage 3 on the h2
    that stage 2 produced in step t - 1 (batch t - 2's labels). Every stage
    reads the weights of the start of the step; all updates (Adam step
    t + 1) come at the end. M1 is trained on the gradient that stage 2 sends
    to its input, M2 on the gradient that stage 3 sends to its input (with
    M's weights of the start of the step). A stage without a batch yet
    (the first two steps) changes nothing; so does a stage whose mask is
    False (its network weights and the M at its output). With
    `calibration`, stage 1 sends M1's prediction times the calibration
    factor of the start of the step, and M1's calibration statistics take
    in the prediction it made for the held h1 and the gradient stage 2
    sends back for it.
    """

    def __init__(self, params, solver="gradient", calibration=False):
        super().__init__(params, solver, calibration)
        self.held1 = None  # (h1, one-hot labels, M1's prediction) from the last step
        self.held2 = None  # (h2, one-hot labels)
        self.loss = self.accuracy = None  # of the batch stage 3 saw

    def step(self, x, y, masks=(True, True, True)):
        c = {k: tf.constant(v) for k, v in self.p.items()}
        x = tf.constant(x, tf.float64)
        onehot = tf.one_hot(y, CLASSES, dtype=tf.float64)
        updates = []  # (keys, grads, lr, on) or ("fit", stage, h, target, labels, on)
        # Stage 1 on batch t.
        with tf.GradientTape() as tape:
            tape.watch([c["w1"], c["b1"]])
            h1 = tf.tanh(x @ c["w1"] + c["b1"])
        p1 = self._inputs(1, h1) @ c["k1"] + c["c1"]
        sent = self._factor() * p1
        grads = tape.gradient(h1, [c["w1"], c["b1"]], output_gradients=sent / B)
        updates.append((NETWORK[1], grads, LR, masks[0]))
        new_held2 = None
        if self.held1 is not None:
            h1_old, labels1, p1_old = self.held1
            with tf.GradientTape() as tape:
                tape.watch([c["w2"], c["b2"], h1_old])
                h2 = tf.tanh(h1_old @ c["w2"] + c["b2"])
            p2 = self._inputs(2, h2) @ c["k2"] + c["c2"] + labels1 @ c["l2"]
            *grads, dh1 = tape.gradient(
                h2, [c["w2"], c["b2"], h1_old], output_gradients=p2 / B
            )
            updates.append((NETWORK[2], grads, LR, masks[1]))
            updates.append(("gm", 1, h1_old, dh1 * B, None, masks[0]))
            self._calibrate(p1_old, dh1 * B)  # after `_factor()` above
            new_held2 = (h2, labels1)
        if self.held2 is not None:
            h2_old, labels2 = self.held2
            with tf.GradientTape() as tape:
                tape.watch([c["w3"], c["b3"], h2_old])
                probs = tf.nn.softmax(h2_old @ c["w3"] + c["b3"])
                loss = -tf.reduce_mean(tf.reduce_sum(labels2 * tf.math.log(probs), -1))
            *grads, dh2 = tape.gradient(loss, [c["w3"], c["b3"], h2_old])
            self.loss = float(loss)
            hits = tf.argmax(probs, -1) == tf.argmax(labels2, -1)
            self.accuracy = float(tf.reduce_mean(tf.cast(hits, tf.float64)))
            updates.append((NETWORK[3], grads, LR, masks[2]))
            updates.append(("gm", 2, h2_old, dh2 * B, labels2, masks[1]))
        # The M trained by Adam use their weights of the start of the step.
        start = dict(self.p)
        for update in updates:
            if update[0] == "gm":
                _, stage, h, target, labels, on = update
                if self.solver == "least_squares":
                    self._fit(stage, h, target, labels, on)
                else:
                    keys = GRADIENT_MODEL[stage]
                    saved = {k: self.p[k] for k in keys}
                    self.p.update({k: start[k] for k in keys})
                    grads = self._regression(keys, h, target, labels)
                    self.p.update(saved)
                    self._update(keys, grads, SG_LR, on)
            else:
                self._update(*update)
        self.held1 = (h1, onehot, p1)
        self.held2 = new_held2
        self.t += 1


@pytest.mark.parametrize(
    "cls, solver",
    [
        (keras_dni.DNISequential, "gradient"),
        (keras_dni.DNISequential, "least_squares"),
        (keras_dni.DNIModel, "gradient"),
    ],
)
@pytest.mark.parametrize("calibration", [False, True])
def test_weights_and_adam_states_match_hand_written_reference(cls, solver, calibration):
    steps = 5
    x, y = _data(steps)
    model = _compile(
        _model(cls, solver=solver, calibration=calibration), schedule="pipelined"
    )
    ref = PipelinedReference(_snapshot(model), solver, calibration)
    if calibration:
        _start_calibration(model, ref)
    for s in range(steps):
        ref.step(x[s * B : (s + 1) * B], y[s * B : (s + 1) * B])
    model.fit(x, y, batch_size=B, shuffle=False, verbose=0)
    _assert_matches(model, ref, steps)
    if calibration:  # the factor was in use, strictly inside its bounds
        assert 0.0 < ref._factor() < 1.0, ref.calibration


@pytest.mark.parametrize("solver", ["gradient", "least_squares"])
def test_update_probability_matches_reference_with_the_same_draws(solver):
    """p = 0.5: per step each stage and the M at its output change together
    or not at all; the reference with the masks read off gives the same
    weights and Adam states."""
    steps = 7
    x, y = _data(steps)
    keras.utils.set_random_seed(11)
    model = _compile(
        _model(solver=solver), schedule="pipelined", update_probability=0.5
    )
    recorder = SnapshotRecorder(_snapshot)
    model.fit(x, y, batch_size=B, shuffle=False, verbose=0, callbacks=[recorder])
    snaps = recorder.snapshots
    masks = []
    for s, (before, after) in enumerate(zip(snaps[:-1], snaps[1:])):
        step_masks = []
        for stage in (1, 2, 3):
            changed = [not np.array_equal(before[k], after[k]) for k in NETWORK[stage]]
            assert all(changed) or not any(changed), (s, stage, changed)
            step_masks.append(changed[0])
        # M_k changes when stage k's draw is on and stage k + 1 had a batch.
        for stage, keys in GRADIENT_MODEL.items():
            changed = [not np.array_equal(before[k], after[k]) for k in keys]
            assert all(changed) or not any(changed), (s, keys, changed)
            if s >= stage:
                assert changed[0] == step_masks[stage - 1], (s, stage)
            else:
                assert not any(changed), (s, stage)
        masks.append(tuple(step_masks))
    assert not any(masks[0][1:]) and not masks[1][2]  # filling
    flat = [m for step in masks[2:] for m in step]
    assert any(flat) and not all(flat), masks
    # The draws of the stages still filling are not visible: any value
    # gives the same reference there.
    ref = PipelinedReference(snaps[0], solver)
    for s in range(steps):
        ref.step(x[s * B : (s + 1) * B], y[s * B : (s + 1) * B], masks[s])
    _assert_matches(model, ref, steps)


def test_loss_and_metrics_are_those_of_the_batch_the_last_stage_saw():
    """One step per `fit` call: the logged loss and accuracy are those of the
    batch that entered two steps earlier (none while the pipeline fills)."""
    steps = 5
    x, y = _data(steps)
    model = _compile(_model(solver="gradient"), schedule="pipelined")
    model.compile(
        model.optimizer,
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        sg_optimizer=model.sg_optimizer,
        schedule="pipelined",
    )
    ref = PipelinedReference(_snapshot(model))
    for s in range(steps):
        part = slice(s * B, (s + 1) * B)
        ref.step(x[part], y[part])
        logs = model.fit(x[part], y[part], batch_size=B, verbose=0).history
        if s < 2:
            assert ref.loss is None
            assert logs["loss"] == [0.0] and logs["accuracy"] == [0.0]
        else:
            np.testing.assert_allclose(logs["loss"][0], ref.loss, rtol=1e-5)
            np.testing.assert_allclose(logs["accuracy"][0], ref.accuracy, rtol=1e-6)
    _assert_matches(model, ref, steps)


def test_fit_with_partial_batch_evaluate_predict_and_checkpoint(tmp_path):
    x, y = _data(5)
    x, y = x[:-3], y[:-3]  # the last batch of each epoch has 5 examples
    model = _model()
    model.compile(
        "adam",
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        schedule="pipelined",
        stage_devices=["/cpu:0", "/cpu:1", "/cpu:0"],
    )
    path = os.path.join(tmp_path, "model.keras")
    history = model.fit(
        x,
        y,
        batch_size=B,
        epochs=3,
        verbose=0,
        validation_data=(x, y),
        callbacks=[keras.callbacks.ModelCheckpoint(path)],
    )
    assert {"loss", "accuracy", "sg_loss_d1", "sg_loss_d2", "val_loss"} <= set(
        history.history
    )
    assert np.all(np.isfinite(history.history["loss"]))
    held = model._dni_schedule.pipeline.held
    # The partial last batch moves on through the pipeline.
    assert [h.h.numpy().shape[0] for h in held] == [5, B]
    assert model.predict(x, verbose=0).shape == (len(x), CLASSES)
    loaded = keras.models.load_model(path)
    assert loaded.get_compile_config()["schedule"] == "pipelined"
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )
    loaded.fit(x, y, batch_size=B, verbose=0)  # starts with an empty pipeline


def test_bad_arguments():
    with pytest.raises(ValueError, match="XLA.*jit_compile=True"):
        _model().compile("adam", "mse", schedule="pipelined", jit_compile=True)
    with pytest.raises(ValueError, match="`stage_devices`.*3 stages"):
        _model().compile("adam", "mse", schedule="pipelined", stage_devices=["/cpu:0"])


_TWO_DEVICES = r"""
import sys
import numpy as np
import keras
import tensorflow as tf
sys.path.insert(0, sys.argv[1])
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 2,
)
from test_schedules import B, _compile, _data, _model, _snapshot
x, y = _data(5)
out = {}
for name, devices in (("one", None), ("two", ["/cpu:0", "/cpu:1", "/cpu:0"])):
    keras.utils.set_random_seed(4)
    model = _compile(_model(), schedule="pipelined", stage_devices=devices)
    model.fit(x, y, batch_size=B, shuffle=False, verbose=0)
    for key, value in _snapshot(model).items():
        out[f"{name}_{key}"] = value
np.savez(sys.argv[2], **out)
"""


def test_two_logical_devices_give_the_same_result_as_one(tmp_path):
    """Stages on /cpu:0 and /cpu:1 (two logical devices, a fresh process)."""
    result = os.path.join(tmp_path, "weights.npz")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run(
        [sys.executable, "-c", _TWO_DEVICES, os.path.dirname(__file__), result],
        check=True,
        env=env,
        timeout=300,
    )
    weights = np.load(result)
    keys = [k[len("one_") :] for k in weights.files if k.startswith("one_")]
    assert keys
    for key in keys:
        np.testing.assert_allclose(
            weights[f"two_{key}"], weights[f"one_{key}"], rtol=1e-6, err_msg=key
        )
