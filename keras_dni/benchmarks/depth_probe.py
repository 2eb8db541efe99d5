"""Why deep DNI networks collapse: one run with per-layer diagnostics.

`python -m keras_dni.benchmarks.depth_probe` trains one MLP (digits or the
MNIST subset, the bench CLI's split) with backprop, DNI or cDNI and prints
one JSON line: held-out accuracy every few epochs and, for DNI, the cosine
between the gradient each layer trains with and the true gradient
(`callbacks.SyntheticGradientMonitor`, mean of the last five measurements,
bottom layer first) and each layer's final `sg_loss`; with
`--layer-stats`, also how many units of each hidden layer are inactive on
every held-out example and the RMS of each layer's output, along the
curve; with `--trace-epochs`, after every step of those epochs, on a
fixed batch of training examples: the loss, and per layer the RMS of the
true per-example gradient at the layer's output, of the synthetic gradient
the layer sends, and their cosine. Options reproduce the variants of
`docs/depth.md`: the gradient models' solver, window, ridge, prediction
clip and learning rate, the hidden layers' kernel initialiser, batch
normalisation in the network (as in the paper), SGD with momentum.

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
    from keras_dni.benchmarks.runs import prediction_clip_value

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
        "--solver-ridge",
        type=float,
        default=None,
        help="the gradient models' `sg_solver_ridge` (default: the "
        "library's, `keras_dni.synthetic_gradient.SOLVER_RIDGE`)",
    )
    parser.add_argument(
        "--prediction-clip",
        type=prediction_clip_value,
        default="default",
        help="the gradient models' `sg_prediction_clip` (a float, or "
        "'none'; default: the library's, "
        "`keras_dni.synthetic_gradient.PREDICTION_CLIP`)",
    )
    parser.add_argument(
        "--calibration",
        default="none",
        choices=["none", "all", "top"],
        help="which gradient models get `sg_calibration=True`: none "
        "(default), all, or only the top one (the last hidden layer's)",
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
        "--kernel-initializer",
        default=None,
        help="the hidden layers' `kernel_initializer` (for example "
        "'he_normal'; default: the layer's own default)",
    )
    parser.add_argument(
        "--batch-norm",
        action="store_true",
        help="batch normalisation after every hidden Dense (before the "
        "activation and the decoupling point), as in the paper",
    )
    parser.add_argument("--monitor-every", type=int, default=10)
    parser.add_argument(
        "--layer-stats",
        action="store_true",
        help="also record, with each point of the curve, per hidden layer "
        "(bottom first) the fraction of units inactive (<= 0) on every "
        "held-out example and the RMS of the layer's output",
    )
    parser.add_argument(
        "--trace-epochs",
        type=_epoch_range,
        default=None,
        metavar="FIRST-LAST",
        help="DNI only: after every step of these epochs (1-based, "
        "inclusive), on the first 512 training examples, record the loss "
        "and per hidden layer (bottom first) the RMS of the true "
        "per-example gradient at its output, of the synthetic gradient it "
        "sends, and their cosine",
    )
    return parser


def _epoch_range(value):
    first, _, last = value.partition("-")
    try:
        first, last = int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected FIRST-LAST (epochs, e.g. 44-48), received {value!r}"
        ) from None
    if not 1 <= first <= last:
        raise argparse.ArgumentTypeError(
            f"expected 1 <= FIRST <= LAST, received {value!r}"
        )
    return first, last


def build(args, input_dim):
    import keras

    import keras_dni
    from keras_dni.benchmarks import runs
    from keras_dni.synthetic_gradient import PREDICTION_CLIP
    from keras_dni.synthetic_gradient import SOLVER_RIDGE

    layers = [keras.Input((input_dim,))]
    dni = args.method != "backprop"
    normalization = runs.sg_input_normalization(args.sg_input_normalization)
    ridge = SOLVER_RIDGE if args.solver_ridge is None else args.solver_ridge
    clip = runs.resolve_prediction_clip(args.prediction_clip, PREDICTION_CLIP)
    calibrated = {
        "none": range(0),
        "all": range(args.depth),
        "top": range(args.depth - 1, args.depth),
    }[args.calibration]
    init = {}
    if args.kernel_initializer is not None:
        init["kernel_initializer"] = args.kernel_initializer
    for i in range(args.depth):
        name = f"hidden_{i}"
        if args.batch_norm:
            layers += [
                keras.layers.Dense(args.width, name=f"dense_{i}", **init),
                keras.layers.BatchNormalization(name=f"bn_{i}"),
                keras.layers.Activation(args.activation, name=f"act_{i}"),
            ]
            if dni:
                layers.append(
                    keras_dni.SyntheticGradient(
                        conditional=args.method == "cdni",
                        solver=args.solver,
                        solver_decay=args.solver_decay,
                        solver_ridge=ridge,
                        prediction_clip=clip,
                        calibration=i in calibrated,
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
                    sg_solver_ridge=ridge,
                    sg_prediction_clip=clip,
                    sg_calibration=i in calibrated,
                    sg_input_normalization=normalization,
                    name=name,
                    **init,
                )
            )
        else:
            layers.append(
                keras.layers.Dense(
                    args.width, activation=args.activation, name=name, **init
                )
            )
    layers.append(keras.layers.Dense(10, activation="softmax", name="output"))
    return (keras_dni.DNISequential if dni else keras.Sequential)(layers)


def _step_trace(model, args, x, y, records):
    """The `--trace-epochs` callback: one record in `records` per step."""
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_dni

    points = [model.get_layer(f"hidden_{i}") for i in range(args.depth)]
    models = [
        p if isinstance(p, keras_dni.SyntheticGradient) else p.synthetic_gradient
        for p in points
    ]
    outputs = keras.Model(model.inputs, [p.output for p in points] + model.outputs)
    inputs, targets = tf.constant(x[:512]), tf.constant(y[:512])
    labels = tf.one_hot(targets, 10)
    first, last = args.trace_epochs

    def rounded(values):
        return [float(f"{v:.3g}") for v in values]

    class Trace(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch + 1

        def on_train_batch_end(self, batch, logs=None):
            if not first <= self.epoch <= last:
                return
            with tf.GradientTape() as tape:
                values = outputs(inputs, training=False)
                losses = keras.losses.sparse_categorical_crossentropy(
                    targets, values[-1]
                )
                # Summed: the gradient at h is the per-example gradient.
                total = tf.reduce_sum(losses)
            true = tape.gradient(total, values[:-1])
            true_rms, sent_rms, cosine = [], [], []
            for sg, h, g in zip(models, values[:-1], true):
                sent = sg.sent_gradient(h, labels if sg.conditional else None)
                g, sent = g.numpy().ravel(), sent.numpy().ravel()
                true_rms.append(np.sqrt(np.mean(g**2)))
                sent_rms.append(np.sqrt(np.mean(sent**2)))
                norms = np.linalg.norm(g) * np.linalg.norm(sent)
                cosine.append(float(g @ sent / norms) if norms > 0 else 0.0)
            records.append(
                {
                    "epoch": self.epoch,
                    "step": batch + 1,
                    "loss": float(f"{float(tf.reduce_mean(losses)):.4g}"),
                    "true_rms": rounded(true_rms),
                    "sent_rms": rounded(sent_rms),
                    "cosine": [round(c, 3) for c in cosine],
                }
            )

    return Trace()


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

    every = max(1, args.epochs // 12)
    layer_stats = []
    if args.layer_stats:
        # The hidden layers' outputs (after the activation).
        name = "act_{}" if args.batch_norm else "hidden_{}"
        hidden = keras.Model(
            model.inputs,
            [model.get_layer(name.format(i)).output for i in range(args.depth)],
        )

    class Evaluate(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            pred = self.model.predict(xt, batch_size=1024, verbose=0)
            accuracy.append(float((pred.argmax(axis=1) == yt).mean()))
            if args.layer_stats and epoch % every == 0:
                outputs = hidden.predict(xt, batch_size=1024, verbose=0)
                layer_stats.append(
                    {
                        "epoch": epoch + 1,
                        "inactive": [
                            round(float((h.max(axis=0) <= 0).mean()), 3)
                            for h in outputs
                        ],
                        "rms": [
                            round(float(np.sqrt(np.mean(np.square(h)))), 4)
                            for h in outputs
                        ],
                    }
                )

    trace = []
    if args.trace_epochs is not None:
        callbacks.append(_step_trace(model, args, x, y, trace))
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
        "curve": [round(a, 4) for a in accuracy[::every]],
        "final_loss": float(history.history["loss"][-1]),
        "seconds": round(time.time() - start, 1),
    }
    if args.layer_stats:
        result["layer_stats"] = layer_stats
    if args.trace_epochs is not None:
        result["trace"] = trace
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
    if args.solver_ridge is not None and not args.solver_ridge > 0:
        make_parser().error("--solver-ridge must be positive")
    clip = args.prediction_clip
    if clip not in ("default", None) and not 0 < clip < float("inf"):
        make_parser().error("--prediction-clip must be positive or 'none'")
    if args.trace_epochs is not None and args.method == "backprop":
        make_parser().error("--trace-epochs needs --method dni or cdni")
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
