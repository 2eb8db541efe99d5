"""DNI really learns: held-out accuracy next to backprop, same budget."""

import keras
import numpy as np

import keras_dni
from keras_dni.benchmarks import data


def _accuracy(model, x, y):
    return float((model.predict(x, verbose=0).argmax(1) == y).mean())


def _train(layer_cls, model_cls, x, y, seed, **layer_kwargs):
    keras.utils.set_random_seed(seed)
    model = model_cls(
        [keras.Input((x.shape[1],))]
        + [layer_cls(128, activation="relu", **layer_kwargs) for _ in range(2)]
        + [keras.layers.Dense(10, activation="softmax")]
    )
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=64, epochs=15, verbose=0)
    return model


def test_digits_dni_within_five_points_of_backprop():
    """2-hidden-layer MLP on scikit-learn's digits (75/25 stratified)."""
    (x, y), (xt, yt) = data.digits()
    results = {}
    for seed in (0, 1):
        backprop = _train(keras.layers.Dense, keras.Sequential, x, y, seed)
        # Plain DNI in a shallow network with `sg_calibration=True`, the
        # setting docs/depth.md gives for it (96.2 / 93.8 % here; with every
        # default 92.2 / 94.7 %, seed 0 only 0.1 point above this per-seed
        # bound). DNIDense in a plain keras.Sequential with the stock
        # train_step, then in a DNISequential; cDNI with every default.
        shallow = {"sg_calibration": True}
        stock = _train(keras_dni.DNIDense, keras.Sequential, x, y, seed, **shallow)
        dni = _train(keras_dni.DNIDense, keras_dni.DNISequential, x, y, seed, **shallow)
        cdni = _train(
            keras_dni.DNIDense, keras_dni.DNISequential, x, y, seed, conditional=True
        )
        results[seed] = {
            name: _accuracy(model, xt, yt)
            for name, model in (
                ("backprop", backprop),
                ("stock", stock),
                ("dni", dni),
                ("cdni", cdni),
            )
        }
    print(results)
    for accs in results.values():
        assert accs["backprop"] > 0.9
        for name in ("stock", "dni", "cdni"):
            assert accs[name] >= accs["backprop"] - 0.05, (name, accs)
    mean = {k: np.mean([r[k] for r in results.values()]) for k in results[0]}
    assert mean["cdni"] >= mean["backprop"] - 0.02, mean


def test_binary_addition_data():
    (x, y), (xt, yt) = data.binary_addition(
        bits=6, num_examples=500, num_test=100, seed=3
    )
    assert x.shape == (500, 12) and y.shape == (500, 6)
    left, right = data.from_bits(x[:, :6]), data.from_bits(x[:, 6:])
    assert (left < 32).all() and (right < 32).all()
    np.testing.assert_array_equal(data.from_bits(y), left + right)
    train_pairs = set(map(tuple, x.astype(int)))
    assert not train_pairs & set(map(tuple, xt.astype(int)))
