"""Convert a trained Keras model to DNI, fine-tune it, strip it, serve it.

The life cycle of a model that is trained with synthetic gradients but
served without them, on scikit-learn's 8x8 digits (offline):

1. train a plain `keras.Sequential` MLP with backprop;
2. `keras_dni.apply_dni(model, conditional=True)`: a `DNISequential` copy
   whose hidden `Dense` layers are `DNIDense` layers (cDNI) with the same
   weights, so it makes the same predictions;
3. continue training it with DNI: the model's optimizer updates the
   network from the synthetic gradients, and each linear gradient model is
   refitted by least squares after every batch (the default
   `sg_solver="auto"`; `compile(sg_optimizer=...)` would only be used with
   `apply_dni(..., sg_solver="gradient")`);
4. `keras_dni.strip_dni`: a plain `keras.Sequential` with the same weights
   and the same predictions, without any gradient model;
5. `model.export(path)`: a TensorFlow SavedModel, reloaded with
   `tf.saved_model.load` and called through its `serve` endpoint; its
   predictions are checked against the stripped Keras model's.

It prints the held-out accuracy at each stage.

    python examples/convert_finetune_export.py [--out results/convert_finetune_export]

takes under a minute on 2 CPU cores. `--smoke` runs it in seconds.
"""

import argparse
import os

import keras
import numpy as np
import tensorflow as tf

import keras_dni
from keras_dni.benchmarks import data


def accuracy(probabilities, labels):
    return 100 * float(np.mean(np.argmax(probabilities, axis=-1) == labels))


def layer_types(model):
    return [type(layer).__name__ for layer in model.layers]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=os.path.join("results", "convert_finetune_export")
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny budget, runs in seconds (for tests)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.pretrain_epochs, args.finetune_epochs = 1, 1
    keras.utils.set_random_seed(args.seed)
    (x, y), (x_test, y_test) = data.digits()
    if args.smoke:
        x, y = x[:256], y[:256]

    # 1. A plain Keras model, trained with backprop.
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu", name="hidden_1"),
            keras.layers.Dense(128, activation="relu", name="hidden_2"),
            keras.layers.Dense(10, activation="softmax", name="output"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x, y, batch_size=64, epochs=args.pretrain_epochs, verbose=0)
    plain_predictions = model.predict(x_test, verbose=0)
    print(
        f"1. backprop, {args.pretrain_epochs} epochs: held-out accuracy "
        f"{accuracy(plain_predictions, y_test):.2f} %  {layer_types(model)}"
    )

    # 2. The same model with its hidden layers decoupled (cDNI). The output
    # layer keeps the true gradient. Same weights, same predictions.
    dni_model = keras_dni.apply_dni(model, conditional=True)
    np.testing.assert_allclose(
        dni_model.predict(x_test, verbose=0), plain_predictions, rtol=1e-6, atol=1e-7
    )
    print(
        "2. apply_dni: same predictions as the backprop model  "
        f"{type(dni_model).__name__} {layer_types(dni_model)}"
    )

    # 3. Continue training with synthetic gradients. The gradient models
    # are fitted by least squares after each batch (no `sg_optimizer`).
    dni_model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = dni_model.fit(x, y, batch_size=64, epochs=args.finetune_epochs, verbose=0)
    dni_predictions = dni_model.predict(x_test, verbose=0)
    sg_losses = {
        k: f"{v[-1]:.3g}" for k, v in history.history.items() if "sg_loss_" in k
    }
    print(
        f"3. cDNI fine-tuning, {args.finetune_epochs} epochs: held-out accuracy "
        f"{accuracy(dni_predictions, y_test):.2f} %  (last epoch's {sg_losses})"
    )

    # 4. Strip the DNI machinery for serving: plain Keras layers, same weights.
    served = keras_dni.strip_dni(dni_model)
    served_predictions = served.predict(x_test, verbose=0)
    np.testing.assert_allclose(
        served_predictions, dni_predictions, rtol=1e-6, atol=1e-7
    )
    print(
        "4. strip_dni: held-out accuracy "
        f"{accuracy(served_predictions, y_test):.2f} %  "
        f"{type(served).__name__} {layer_types(served)}"
    )

    # 5. Export a SavedModel, reload it with TensorFlow alone, serve a batch.
    path = os.path.join(args.out, "saved_model")
    served.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)
    saved_predictions = reloaded.serve(tf.constant(x_test)).numpy()
    np.testing.assert_allclose(
        saved_predictions, served_predictions, rtol=1e-5, atol=1e-6
    )
    difference = np.max(np.abs(saved_predictions - served_predictions))
    print(
        f"5. export + tf.saved_model.load: held-out accuracy "
        f"{accuracy(saved_predictions, y_test):.2f} %  ({path})"
    )
    print(
        "SavedModel predictions equal the stripped Keras model's "
        f"(max abs difference {difference:.2g})."
    )


if __name__ == "__main__":
    main()
