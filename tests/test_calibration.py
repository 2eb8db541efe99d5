"""`calibration`: the synthetic gradient scaled by how well `M` predicts.

Checked against numpy: the running statistics and the factor (from the
predictions sent and the gradients that arrived), the factor applied by
every schedule (the first stage's update by hand, the statistics from a hand
computation of the true gradient), which layers calibrate by default, the
config, argument errors, and weights files saved before the statistics
existed.
"""

import keras
import numpy as np
import pytest
from helpers import assert_argument_rejected
from helpers import assert_sgd_update
from helpers import check_loads_without
from helpers import one_dni_layer_model
from helpers import sent_below
from helpers import set_linear_gradient_model
from helpers import small_dni_model

import keras_dni
from keras_dni.synthetic_gradient import CALIBRATION_DECAY

BATCH, WIDTH = 6, 5


def _layer(calibration=True):
    sg = keras_dni.SyntheticGradient(
        solver="gradient",
        input_normalization=None,
        prediction_clip=None,
        calibration=calibration,
    )
    sg.build((None, WIDTH))
    return sg


def _factor(product, energy):
    return 1.0 if energy <= 0.0 else float(np.clip(product / energy, 0.0, 1.0))


def test_factor_follows_the_predictions_and_their_targets():
    rng = np.random.default_rng(0)
    sg = _layer()
    kernel, bias = set_linear_gradient_model(sg, rng)
    product = energy = 0.0
    # Targets a half, three times, and minus the prediction (plus noise):
    # the factor moves between the bounds of [0, 1].
    for multiple in (0.5, 3.0, -2.0, 0.5):
        h = rng.normal(size=(BATCH, WIDTH)).astype("float32")
        prediction = h @ kernel + bias
        target = multiple * prediction + 0.1 * rng.normal(size=prediction.shape)
        # (`M` is not trained here: no optimizer step.)
        sent = sent_below(sg, h, (target / BATCH).astype("float32")) * BATCH
        # Sent: the prediction times the factor of the batches before.
        np.testing.assert_allclose(
            sent, _factor(product, energy) * prediction, rtol=1e-5, atol=1e-6
        )
        batch_product = np.mean(prediction * target)
        batch_energy = np.mean(prediction**2)
        keep = CALIBRATION_DECAY if energy > 0.0 else 0.0  # the first batch sets it
        product = keep * product + (1 - keep) * batch_product
        energy = keep * energy + (1 - keep) * batch_energy
        np.testing.assert_allclose(sg._calibration.product.numpy(), product, rtol=1e-4)
        np.testing.assert_allclose(sg._calibration.energy.numpy(), energy, rtol=1e-4)
        np.testing.assert_allclose(
            sg.calibration_factor().numpy(), _factor(product, energy), rtol=1e-4
        )
    assert 0.0 < _factor(product, energy) < 1.0


def test_bounds_of_the_factor():
    sg = _layer()
    assert sg.calibration_factor().numpy() == 1.0  # no statistics yet
    for product, expected in ((-0.4, 0.0), (0.3, 0.6), (2.0, 1.0)):
        sg._calibration.product.assign(product)
        sg._calibration.energy.assign(0.5)
        np.testing.assert_allclose(sg.calibration_factor().numpy(), expected)


def test_zero_prediction_and_non_finite_batches_are_skipped():
    rng = np.random.default_rng(1)
    sg = _layer()  # M starts at zero: its first predictions are zero
    h = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    sent_below(sg, h, rng.normal(size=(BATCH, WIDTH)).astype("float32"))
    assert sg._calibration.energy.numpy() == 0.0
    assert sg.calibration_factor().numpy() == 1.0
    set_linear_gradient_model(sg, rng)
    sg._calibration.product.assign(0.2)
    sg._calibration.energy.assign(0.8)
    target = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    target[0, 0] = np.nan
    sg.record_calibration(sg.predict_gradient(h), target, 1.0)
    target[0, 0] = 1.0
    sg.record_calibration(sg.predict_gradient(h), target, 0.0)
    assert sg._calibration.product.numpy() == np.float32(0.2)
    assert sg._calibration.energy.numpy() == np.float32(0.8)


def test_off_by_default():
    assert keras_dni.SyntheticGradient().calibration is False
    assert keras_dni.DNIDense(4).synthetic_gradient.calibration is False
    assert keras_dni.DNIConv2D(2, 3).synthetic_gradient.calibration is False
    rnn = keras_dni.DNIRNN(keras.layers.LSTMCell(4), truncation=2)
    assert rnn.synthetic_gradient.calibration is False
    cdni = keras_dni.DNIDense(4, conditional=True, sg_calibration=True)
    assert cdni.synthetic_gradient.calibration is True
    off = _layer(calibration=False)
    off._calibration.product.assign(0.1)
    off._calibration.energy.assign(1.0)
    assert off.calibration_factor().numpy() == 1.0


@pytest.mark.parametrize("schedule", ["locked", "unlocked", "pipelined"])
def test_every_schedule_sends_the_calibrated_prediction(schedule):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(BATCH, 4)).astype("float32")
    y = rng.normal(size=(BATCH, 2)).astype("float32")
    keras.utils.set_random_seed(0)
    learning_rate = 0.1
    model = one_dni_layer_model(
        schedule, learning_rate, WIDTH, sg_prediction_clip=None, sg_calibration=True
    )
    layer, top = model.get_layer("d"), model.get_layer("top")
    sg = layer.synthetic_gradient
    kernel, bias = set_linear_gradient_model(sg, rng)
    sg._calibration.product.assign(0.3)
    sg._calibration.energy.assign(1.5)
    w0, b0 = layer.kernel.numpy().copy(), layer.bias.numpy().copy()
    v0, c0 = top.kernel.numpy().copy(), top.bias.numpy().copy()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    # The first stage updates at once from 0.2 * M(h), by hand:
    h = x @ w0 + b0
    prediction = h @ kernel + bias
    assert_sgd_update(layer, w0, b0, x, 0.2 * prediction, learning_rate)
    if schedule == "pipelined":
        return  # the last stage sees this batch at the next step
    # The statistics take in this batch: the per-example true gradient of
    # the mean squared error at h, (out - y) V^T (2 / (2 * BATCH) * BATCH).
    target = (h @ v0 + c0 - y) @ v0.T
    keep = CALIBRATION_DECAY
    np.testing.assert_allclose(
        sg._calibration.product.numpy(),
        keep * 0.3 + (1 - keep) * np.mean(prediction * target),
        rtol=1e-4,
    )
    np.testing.assert_allclose(
        sg._calibration.energy.numpy(),
        keep * 1.5 + (1 - keep) * np.mean(prediction**2),
        rtol=1e-4,
    )


def test_sent_gradient_includes_the_factor():
    rng = np.random.default_rng(3)
    sg = _layer()
    kernel, bias = set_linear_gradient_model(sg, rng)
    sg._calibration.product.assign(0.25)
    sg._calibration.energy.assign(1.0)
    h = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    np.testing.assert_allclose(
        sg.sent_gradient(h).numpy(), 0.25 * (h @ kernel + bias), rtol=1e-5, atol=1e-6
    )


def test_config_round_trip():
    layer = keras_dni.DNIDense(4, sg_calibration=True)
    config = layer.get_config()
    assert config["sg_calibration"] is True
    assert keras_dni.DNIDense.from_config(config).synthetic_gradient.calibration is True
    # A config saved before `calibration` existed gets the default.
    del config["sg_calibration"]
    assert (
        keras_dni.DNIDense.from_config(config).synthetic_gradient.calibration is False
    )
    conv = keras_dni.DNIConv2D(2, 3, sg_calibration=True)
    restored = keras_dni.DNIConv2D.from_config(conv.get_config())
    assert restored.synthetic_gradient.calibration is True
    sg = keras_dni.SyntheticGradient(calibration=True)
    assert keras_dni.SyntheticGradient.from_config(sg.get_config()).calibration is True
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)]
    )
    converted = keras_dni.apply_dni(model, sg_calibration=True)
    assert converted.layers[0].synthetic_gradient.calibration is True


@pytest.mark.parametrize("value", ["auto", 1, None])
def test_argument_errors(value):
    assert_argument_rejected("calibration", value, TypeError)


def test_weights_saved_without_the_calibration_still_load(tmp_path):
    def build():
        return small_dni_model(sg_calibration=True)

    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    model = build()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert model.get_layer("d").synthetic_gradient._calibration.energy.numpy() > 0
    # As a file written before `calibration` existed.
    check_loads_without(model, build, str(tmp_path / "model.weights.h5"), "calibration")
