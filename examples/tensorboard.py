"""Watch synthetic gradients in TensorBoard.

Trains a DNI MLP (two `keras_dni.DNIDense` hidden layers in a
`keras_dni.DNISequential`) on scikit-learn's 8x8 digits (offline) with two
callbacks:

- `keras_dni.callbacks.SyntheticGradientMonitor(every_n_batches)`: every N
  batches, one extra exact-backprop pass on the current batch measures, per
  DNI layer, the cosine (`sg_cosine_<layer>`) and the relative error
  (`sg_rel_error_<layer>`) between the synthetic gradient the layer trains
  with and the true gradient;
- `keras.callbacks.TensorBoard(log_dir)`, placed *after* the monitor so that
  it records the monitor's values with the losses, including each gradient
  model's regression loss (`sg_loss_<layer>`, the error of its prediction
  on each batch before it is refitted by least squares, the default).

It then reads the event files back (`read_scalars`, TensorFlow only) and
prints each scalar tag with its first and last value.

    python examples/tensorboard.py [--epochs 10] [--out results/tensorboard]
    tensorboard --logdir results/tensorboard/logs

takes under a minute on 2 CPU cores. `--smoke` runs it in seconds.
"""

import os
import sys

# This file has the name of the `tensorboard` package, which TensorFlow
# imports for `tf.summary`: keep its directory out of the import path so
# that `python examples/tensorboard.py` does not import itself instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import glob  # noqa: E402
import importlib.util  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_dni  # noqa: E402
from keras_dni.benchmarks import data  # noqa: E402


def read_scalars(log_dir):
    """Reads the scalars of every event file under `log_dir`.

    Args:
        log_dir: the directory given to `keras.callbacks.TensorBoard`.

    Returns:
        A dict `{run: {tag: [(step, value), ...]}}`, where `run` is the
        event file's directory relative to `log_dir` (`train`,
        `validation`). TF2 summaries store a scalar as a tensor with the
        `scalars` plugin; TF1-style `simple_value`s are read too.
    """
    scalars = {}
    pattern = os.path.join(log_dir, "**", "*tfevents*")
    for path in sorted(glob.glob(pattern, recursive=True)):
        run = os.path.relpath(os.path.dirname(path), log_dir)
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    number = value.simple_value
                elif value.metadata.plugin_data.plugin_name == "scalars":
                    number = float(tf.make_ndarray(value.tensor))
                else:
                    continue
                tags = scalars.setdefault(run, {})
                tags.setdefault(value.tag, []).append((event.step, number))
    return scalars


def scalar_tags(log_dir):
    """The sorted scalar tags written under `log_dir`, all runs together."""
    return sorted({tag for tags in read_scalars(log_dir).values() for tag in tags})


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--every-n-batches", type=int, default=5, help="how often the monitor measures"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("results", "tensorboard"))
    parser.add_argument(
        "--smoke", action="store_true", help="tiny budget, runs in seconds (for tests)"
    )
    args = parser.parse_args(argv)
    if importlib.util.find_spec("tensorboard") is None:
        # `tf.summary`, which the TensorBoard callback writes with, lives there.
        sys.exit(
            "This example needs the `tensorboard` package (not installed by "
            "TensorFlow itself): pip install tensorboard"
        )
    (x, y), (x_test, y_test) = data.digits()
    if args.smoke:
        x, y, args.epochs, args.every_n_batches = x[:256], y[:256], 2, 2

    keras.utils.set_random_seed(args.seed)
    model = keras_dni.DNISequential(
        [
            keras.Input((64,)),
            keras_dni.DNIDense(128, activation="relu", name="hidden_1"),
            keras_dni.DNIDense(128, activation="relu", name="hidden_2"),
            keras.layers.Dense(10, activation="softmax", name="output"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    log_dir = os.path.join(args.out, "logs")
    callbacks = [
        # The monitor first: it adds its measurements to the logs that the
        # TensorBoard callback then writes.
        keras_dni.callbacks.SyntheticGradientMonitor(args.every_n_batches),
        keras.callbacks.TensorBoard(log_dir),
    ]
    model.fit(
        x,
        y,
        batch_size=64,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        callbacks=callbacks,
        verbose=0,
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"Held-out accuracy after {args.epochs} epochs: {100 * accuracy:.2f} %")

    print(f"\nScalars in {log_dir} (first -> last epoch):")
    for run, tags in read_scalars(log_dir).items():
        for tag, points in sorted(tags.items()):
            values = np.array([value for _, value in points])
            print(f"  {run}/{tag}: {values[0]:.4g} -> {values[-1]:.4g}")
    print(f"\nScalar tags: {', '.join(scalar_tags(log_dir))}")
    print(f"View them with: tensorboard --logdir {log_dir}")


if __name__ == "__main__":
    main()
