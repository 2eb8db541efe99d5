"""Why deep DNI networks collapse: one run with per-layer diagnostics.

`python -m keras_dni.benchmarks.depth_probe` trains one MLP (digits or the
MNIST subset, the bench CLI's split) with backprop, DNI or cDNI and prints
one JSON line: held-out accuracy every few epochs and, for DNI, the cosine
between the gradient each layer trains with and the true gradient
(`callbacks.SyntheticGradientMonitor`, mean of the last five measurements,
bottom layer first) and each layer's final `sg_loss`. Options reproduce the
variants of `docs/depth.md`: the gradient models' solver and learning rate,
batch normalisation in the network (as in the paper), SGD with momentum.

Example:

    python -m keras_dni.benchmarks.depth_probe --method cdni --depth 5 \\
        --solver gradient
"""

import argparse
import json
import os
import sys
import time


def make_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_dni.benchmarks.depth_probe", description=__doc__
    )
    parser.add_argument("--task", default="digits", choices=["digits", "mnist5k"])
    parser.add_argument("--method", default="cdni", choices=["backprop", "dni", "cdni"])
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument(
        "--activation", default="relu", choices=["relu", "tanh", "sigmoid"]
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--optimizer",
        default="adam",
        choices=["adam", "sgd"],
        help="the network's: Adam, or SGD with momentum 0.9",
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--solver",
        default="auto",
        choices=["auto", "least_squares", "gradient"],
        help="the gradient models' `sg_solver`",
    )
    parser.add_argument(
        "--solver-decay",
        default="auto",
        type=lambda v: v if v == "auto" else float(v),
        help="the gradient models' `sg_solver_decay` ('auto' or a float)",
    )
    parser.add_argument(
        "--sg-learning-rate",
        type=float,
        default=1e-3,
        help="Adam learning rate of `sg_optimizer` (solver 'gradient')",
    )
    parser.add_argument(
        "--sg-input-normalization",
        default="auto",
        choices=["auto", "layer", "none"],
        help="the gradient models' `sg_input_normalization`",
    )
    parser.add_argument(
        "--batch-norm",
        action="store_true",
        help="batch normalisation after every hidden Dense (before the "
        "activation and the decoupling point), as in the paper",
    )
    parser.add_argument("--monitor-every", type=int, default=10)
    return parser


def build(args, input_dim):
    import keras

    import keras_dni
    from keras_dni.benchmarks import runs

    layers = [keras.Input((input_dim,))]
    dni = args.method != "backprop"
    normalization = runs.sg_input_normalization(args.sg_input_normalization)
    for i in range(args.depth):
        name = f"hidden_{i}"
        if args.batch_norm:
            layers += [
                keras.layers.Dense(args.width, name=f"dense_{i}"),
                keras.layers.BatchNormalization(name=f"bn_{i}"),
                keras.layers.Activation(args.activation, name=f"act_{i}"),
            ]
            if dni:
                layers.append(
                    keras_dni.SyntheticGradient(
                        conditional=args.method == "cdni",
                        solver=args.solver,
                        solver_decay=args.solver_decay,
                        input_normalization=normalization,
                        name=name,
                    )
                )
        elif dni:
            layers.append(
                keras_dni.DNIDense(
                    args.width,
                    activation=args.activation,
                    conditional=args.method == "cdni",
                    sg_solver=args.solver,
                    sg_solver_decay=args.solver_decay,
                    sg_input_normalization=normalization,
                    name=name,
                )
            )
        else:
            layers.append(
                keras.layers.Dense(args.width, activation=args.activation, name=name)
            )
    layers.append(keras.layers.Dense(10, activation="softmax", name="output"))
    return (keras_dni.DNISequential if dni else keras.Sequential)(layers)


def run(args):
    """Trains one model as `args` say; returns the result dict."""
    import keras
    import numpy as np

    import keras_dni
    from keras_dni.benchmarks import data

    (x, y), (xt, yt) = getattr(data, args.task)()
    keras.utils.set_random_seed(args.seed)
    model = build(args, x.shape[1])
    if args.optimizer == "adam":
        optimizer = keras.optimizers.Adam(args.learning_rate)
    else:
        optimizer = keras.optimizers.SGD(args.learning_rate, momentum=0.9)
    extra = {}
    callbacks = []
    monitor = None
    if args.method != "backprop":
        extra["sg_optimizer"] = keras.optimizers.Adam(args.sg_learning_rate)
        if args.monitor_every:
            monitor = keras_dni.callbacks.SyntheticGradientMonitor(args.monitor_every)
            callbacks.append(monitor)
    model.compile(optimizer, "sparse_categorical_crossentropy", **extra)
    accuracy = []

    class Evaluate(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            pred = self.model.predict(xt, batch_size=1024, verbose=0)
            accuracy.append(float((pred.argmax(axis=1) == yt).mean()))

    start = time.time()
    history = model.fit(
        x,
        y,
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=0,
        callbacks=callbacks + [Evaluate()],
    )
    result = {
        "config": vars(args),
        "accuracy": accuracy[-1],
        "curve": [round(a, 4) for a in accuracy[:: max(1, args.epochs // 12)]],
        "final_loss": float(history.history["loss"][-1]),
        "seconds": round(time.time() - start, 1),
    }
    if args.method != "backprop":
        result["sg_loss"] = {
            key[len("sg_loss_") :]: float(values[-1])
            for key, values in history.history.items()
            if key.startswith("sg_loss_")
        }
    if monitor is not None:
        result["sg_cosine"] = {
            key[len("sg_cosine_") :]: round(
                float(np.mean([value for _, value in values[-5:]])), 3
            )
            for key, values in monitor.history.items()
            if key.startswith("sg_cosine_")
        }
    return result


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = make_parser().parse_args(argv)
    for name in ("depth", "width", "batch_size", "epochs"):
        if getattr(args, name) <= 0:
            make_parser().error(f"--{name.replace('_', '-')} must be positive")
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
