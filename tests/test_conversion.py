"""apply_dni / strip_dni: round trips, layer choice, export, errors."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dni

SHAPE = (8, 8, 1)


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n,) + SHAPE).astype("float32")
    y = np.arange(n) % 3
    return x, y


def _sequential():
    return keras.Sequential(
        [
            keras.Input(SHAPE, name="image"),
            keras.layers.Conv2D(4, 3, activation="relu", name="conv_a"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Conv2D(4, 3, activation="relu", name="conv_b"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(6, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="logits"),
            keras.layers.Softmax(name="probs"),
        ],
        name="seq",
    )


def _functional():
    inputs = keras.Input(SHAPE, name="image")
    a = keras.layers.Conv2D(4, 3, activation="relu", name="conv_a")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", name="conv_b")(a)
    h = keras.layers.Add(name="add")([a, b])
    h = keras.layers.Flatten(name="flat")(keras.layers.MaxPooling2D()(h))
    h = keras.layers.Dense(6, activation="relu", name="hidden")(h)
    probs = keras.layers.Dense(3, activation="softmax", name="probs")(h)
    aux = keras.layers.Activation("tanh", name="aux")(
        keras.layers.Dense(2, name="aux_dense")(h)
    )
    return keras.Model(inputs, [probs, aux], name="func")


def _is_plain(model):
    """No keras_dni class anywhere in `model`, nested models included."""

    def classes(layer):
        yield type(layer)
        for sub in getattr(layer, "layers", ()) or ():
            yield from classes(sub)
        owned = getattr(layer, "synthetic_gradient", None)
        if owned is not None:
            yield type(owned)

    return not any(c.__module__.startswith("keras_dni") for c in classes(model))


def _assert_same_predictions(a, b, x):
    for pa, pb in zip(
        keras.tree.flatten(a.predict(x, verbose=0)),
        keras.tree.flatten(b.predict(x, verbose=0)),
        strict=True,
    ):
        np.testing.assert_array_equal(pa, pb)


def test_sequential_round_trip():
    x, y = _data()
    model = _sequential()
    dni = keras_dni.apply_dni(model, conditional=True, sg_kernel_size=3)
    assert type(dni) is keras_dni.DNISequential and dni.name == "seq"
    assert [type(layer).__name__ for layer in dni.layers] == [
        "DNIConv2D",
        "MaxPooling2D",
        "DNIConv2D",
        "Flatten",
        "DNIDense",
        "Dense",
        "Softmax",
    ]
    assert [layer.name for layer in dni.layers] == [
        layer.name for layer in model.layers
    ]
    assert dni.get_layer("conv_b").synthetic_gradient.kernel_size == 3
    assert dni.get_layer("hidden").synthetic_gradient.conditional
    _assert_same_predictions(model, dni, x)

    # The copy trains (cDNI needs DNISequential) without touching `model`.
    before = [w.copy() for w in model.get_weights()]
    dni.compile("adam", "sparse_categorical_crossentropy")
    dni.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    plain = keras_dni.strip_dni(dni)
    assert type(plain) is keras.Sequential and _is_plain(plain)
    assert [layer.name for layer in plain.layers] == [
        layer.name for layer in model.layers
    ]
    _assert_same_predictions(dni, plain, x)
    _assert_same_predictions(model, keras_dni.strip_dni(keras_dni.apply_dni(model)), x)


def test_functional_round_trip():
    x, _ = _data()
    model = _functional()
    dni = keras_dni.apply_dni(model)
    assert type(dni) is keras_dni.DNIModel and dni.name == "func"
    converted = {
        layer.name
        for layer in dni.layers
        if type(layer) in (keras_dni.DNIDense, keras_dni.DNIConv2D)
    }
    # Both output heads (one behind a weight-free Activation) stay plain.
    assert converted == {"conv_a", "conv_b", "hidden"}
    _assert_same_predictions(model, dni, x)

    plain = keras_dni.strip_dni(dni)
    assert isinstance(plain, keras.Model) and _is_plain(plain)
    assert not isinstance(plain, keras_dni.DNIModel)
    assert [layer.name for layer in plain.layers] == [
        layer.name for layer in model.layers
    ]
    _assert_same_predictions(model, plain, x)


def test_layers_argument_chooses_layers_and_passes_arguments():
    model = _sequential()
    dni = keras_dni.apply_dni(
        model, layers=["conv_b", model.get_layer("logits")], bp_lambda=0.5
    )
    types = {layer.name: type(layer).__name__ for layer in dni.layers}
    assert types["conv_a"] == "Conv2D" and types["hidden"] == "Dense"
    assert types["conv_b"] == "DNIConv2D" and types["logits"] == "DNIDense"
    assert dni.get_layer("logits").synthetic_gradient.initial_bp_lambda == 0.5
    _assert_same_predictions(model, dni, _data()[0])


def test_strip_removes_standalone_and_nested_synthetic_gradients():
    x, y = _data()
    inner = keras_dni.DNISequential(
        [
            keras.Input((6,)),
            keras_dni.DNIDense(5, activation="relu", name="inner_dense"),
            keras_dni.SyntheticGradient(name="inner_sg"),
        ],
        name="inner",
    )
    inputs = keras.Input(SHAPE)
    h = keras_dni.DNIConv2D(4, 3, activation="relu", name="conv")(inputs)
    h = keras_dni.SyntheticGradient(name="sg")(h)
    h = keras.layers.Dense(6, name="fc")(keras.layers.Flatten(name="flat")(h))
    outputs = keras.layers.Dense(3, activation="softmax")(inner(h))
    model = keras_dni.DNIModel(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)

    plain = keras_dni.strip_dni(model)
    assert _is_plain(plain)
    names = [layer.name for layer in plain.layers]
    assert "sg" not in names and "conv" in names
    assert type(plain.get_layer("inner")) is keras.Sequential
    assert [layer.name for layer in plain.get_layer("inner").layers] == ["inner_dense"]
    _assert_same_predictions(model, plain, x)

    seq = keras_dni.strip_dni(
        keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(3),
                keras_dni.SyntheticGradient(),
                keras.layers.Dense(2),
            ]
        )
    )
    assert [type(layer).__name__ for layer in seq.layers] == ["Dense", "Dense"]


def test_stripped_model_exports_and_serves_identical_predictions(tmp_path):
    x, y = _data()
    dni = keras_dni.apply_dni(_sequential(), conditional=True)
    dni.compile("adam", "sparse_categorical_crossentropy")
    dni.fit(x, y, batch_size=8, epochs=1, verbose=0)
    plain = keras_dni.strip_dni(dni)
    path = os.path.join(tmp_path, "export")
    plain.export(path, verbose=False)
    served = tf.saved_model.load(path)
    np.testing.assert_allclose(
        served.serve(x), dni.predict(x, verbose=0), rtol=1e-6, atol=1e-7
    )


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, inputs):
        return self.dense(inputs)


def test_errors():
    model = _sequential()
    with pytest.raises(ValueError, match="no layer 'nope'.*'conv_a'"):
        keras_dni.apply_dni(model, layers=["nope"])
    with pytest.raises(TypeError, match="layer 'flat' is a `Flatten`"):
        keras_dni.apply_dni(model, layers=["flat"])
    with pytest.raises(TypeError, match="unexpected keyword.*'units'"):
        keras_dni.apply_dni(model, units=3)
    with pytest.raises(ValueError, match="`sg_kernel_size`"):
        keras_dni.apply_dni(model, sg_kernel_size=-1)
    dni = keras_dni.apply_dni(model)
    with pytest.raises(TypeError, match="'hidden' is already a DNI layer"):
        keras_dni.apply_dni(dni, layers=["hidden"])
    single = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no hidden `Dense` or `Conv2D`"):
        keras_dni.apply_dni(single)
    subclassed = _Subclassed()
    subclassed(np.zeros((1, 4), "float32"))
    for function in (keras_dni.apply_dni, keras_dni.strip_dni):
        with pytest.raises(TypeError, match="subclassed model of type `_Subclassed`"):
            function(subclassed)
        with pytest.raises(TypeError, match="Received: model of type `Dense`"):
            function(keras.layers.Dense(2))
    with pytest.raises(ValueError, match="needs a built model"):
        keras_dni.apply_dni(keras.Sequential([keras.layers.Dense(2)]))
