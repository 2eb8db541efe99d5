"""Where to decouple: `apply_dni(model, every=k)`."""

import keras
import numpy as np
import pytest

import keras_dni


def _plain(depth=5):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((6,))]
        + [keras.layers.Dense(8, activation="relu", name=f"h{i}") for i in range(depth)]
        + [keras.layers.Dense(3, activation="softmax", name="out")]
    )


def _kinds(model):
    return [(layer.name, type(layer).__name__) for layer in model.layers]


def test_every_k_th_hidden_layer_from_the_bottom():
    model = _plain(depth=5)
    dni = keras_dni.apply_dni(model, every=2)
    assert _kinds(dni) == [
        ("h0", "Dense"),
        ("h1", "DNIDense"),
        ("h2", "Dense"),
        ("h3", "DNIDense"),
        ("h4", "Dense"),
        ("out", "Dense"),
    ]
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    np.testing.assert_allclose(dni.predict(x, verbose=0), model.predict(x, verbose=0))
    # One stage per block: two decoupling points.
    assert len(keras_dni.synthetic_gradient_layers(dni)) == 2


def test_every_applies_to_named_layers():
    dni = keras_dni.apply_dni(_plain(depth=4), layers=["h0", "h2", "h3"], every=3)
    assert [n for n, kind in _kinds(dni) if kind == "DNIDense"] == ["h3"]


def test_every_one_is_every_layer():
    dni = keras_dni.apply_dni(_plain(depth=3), every=1)
    assert [kind for _, kind in _kinds(dni)] == ["DNIDense"] * 3 + ["Dense"]


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "2"])
def test_every_must_be_a_positive_int(every):
    with pytest.raises(ValueError, match=f"Received: every={every!r}"):
        keras_dni.apply_dni(_plain(), every=every)


def test_every_larger_than_the_layers_leaves_nothing_to_convert():
    with pytest.raises(ValueError, match="found no hidden"):
        keras_dni.apply_dni(_plain(depth=2), every=3)
