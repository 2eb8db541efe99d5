"""`.keras` save/load, training resumption, SavedModel export."""

import os

import keras
import numpy as np
import tensorflow as tf

import keras_dni

D_IN, D_OUT = 6, 3


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D_IN)).astype("float32")
    y = (np.arange(n) % D_OUT).astype("int64")
    return x, y


def _model(cls=keras_dni.DNISequential, **kwargs):
    return cls(
        [
            keras.Input((D_IN,)),
            keras_dni.DNIDense(
                8,
                activation="relu",
                name="a",
                sg_hidden_units=(5,),
                sg_batch_norm=True,
                **kwargs,
            ),
            keras_dni.DNIDense(
                8, activation="relu", name="b", conditional=True, bp_lambda=0.2
            ),
            keras_dni.SyntheticGradient(name="sg"),
            keras.layers.Dense(D_OUT, activation="softmax"),
        ]
    )


def _sg_weights(model):
    return [
        v.numpy()
        for layer in keras_dni.synthetic_gradient_layers(model)
        for v in layer.weights
    ]


def test_keras_round_trip_identical_predictions_and_gradient_models(tmp_path):
    x, y = _data()
    model = _model()
    model.compile(
        "adam",
        "sparse_categorical_crossentropy",
        sg_optimizer=keras.optimizers.Adam(2e-3),
    )
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert type(loaded) is keras_dni.DNISequential
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    )
    for a, b in zip(_sg_weights(model), _sg_weights(loaded)):
        np.testing.assert_array_equal(a, b)
    assert loaded.get_layer("b").synthetic_gradient.label_dim == D_OUT
    assert isinstance(loaded.sg_optimizer, keras.optimizers.Adam)
    np.testing.assert_allclose(loaded.sg_optimizer.learning_rate, 2e-3)
    for a, b in zip(model.sg_optimizer.variables, loaded.sg_optimizer.variables):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a, b)
    loaded.fit(x, y, epochs=1, verbose=0)  # training resumes


def test_checkpoint_resume_equals_straight_training(tmp_path):
    """2 epochs straight == 1 epoch, save, load, 1 more epoch."""
    x, y = _data()

    def fresh():
        keras.utils.set_random_seed(7)
        model = _model()
        model.compile("adam", "sparse_categorical_crossentropy")
        return model

    straight = fresh()
    straight.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)

    resumed = fresh()
    resumed.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    path = os.path.join(tmp_path, "ckpt.keras")
    resumed.save(path)
    resumed = keras.models.load_model(path)
    resumed.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)

    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(straight.sg_optimizer.variables, resumed.sg_optimizer.variables):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_functional_dni_model_round_trip(tmp_path):
    x, y = _data()
    inputs = keras.Input((D_IN,))
    h = keras_dni.DNIDense(8, activation="relu", conditional=True)(inputs)
    outputs = keras.layers.Dense(D_OUT, activation="softmax")(h)
    model = keras_dni.DNIModel(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, verbose=0)
    path = os.path.join(tmp_path, "f.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is keras_dni.DNIModel
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    )
    loaded.fit(x, y, verbose=0)


def test_plain_sequential_round_trip(tmp_path):
    x, y = _data()
    model = keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras_dni.DNIDense(8, activation="relu"),
            keras.layers.Dense(D_OUT, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, verbose=0)
    path = os.path.join(tmp_path, "p.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    )
    for a, b in zip(_sg_weights(model), _sg_weights(loaded)):
        np.testing.assert_array_equal(a, b)


def test_saved_model_export_serves_identical_predictions(tmp_path):
    x, y = _data()
    model = _model()
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, verbose=0)
    path = os.path.join(tmp_path, "export")
    model.export(path, verbose=False)
    served = tf.saved_model.load(path)
    np.testing.assert_allclose(served.serve(x), model.predict(x, verbose=0), rtol=1e-6)
    # No synthetic-gradient work in the serving graph: no gradient-model op
    # and no variable of any gradient model.
    concrete = served.serve.get_concrete_function(
        tf.TensorSpec((None, D_IN), tf.float32)
    )
    names = " ".join(op.name for op in concrete.graph.get_operations()) + " ".join(
        v.name for v in concrete.variables
    )
    assert "gradient_model" not in names
    assert "synthetic_gradient" not in names
