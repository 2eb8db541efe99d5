"""One process of the multi-worker test (`tests/test_multiworker.py`).

Usage: ``python tests/multiworker_worker.py OUT_DIR``

With `TF_CONFIG` set, the process is one worker of a
`tf.distribute.MultiWorkerMirroredStrategy` cluster; without it, it trains
the single-process reference under the default strategy. Either way it
trains a DNI and two cDNI `DNISequential` MLPs (the conditional `M` on
layer-normalised and on raw `h`, the default) from the same initial weights
on the same global batches, evaluates the last one, and writes
``<name>.npz`` to OUT_DIR (``single``, or ``worker<index>``): initial and
final weights, the `fit` history of each model, the `evaluate` loss, each
gradient model's prediction on the training data, and which weights belong
to a least-squares gradient model (``<variant>/least_squares``).

Each worker reads the whole dataset, batched by the global batch; with the
`DATA` auto-shard policy `tf.distribute` splits each global batch into one
slice per replica (worker 0 the first half, worker 1 the second), so a step
of the cluster sees the same examples as a step of the reference.
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

# The strategy first: MultiWorkerMirroredStrategy must be created before
# any other TensorFlow op runs in the process.
if os.environ.get("TF_CONFIG"):
    STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()
    NAME = "worker{}".format(json.loads(os.environ["TF_CONFIG"])["task"]["index"])
else:
    STRATEGY = tf.distribute.get_strategy()
    NAME = "single"

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_dni  # noqa: E402

keras.config.disable_traceback_filtering()

D_IN, UNITS, CLASSES = 8, 16, 3
EXAMPLES, GLOBAL_BATCH, EPOCHS = 64, 16, 2
# variant -> (conditional, sg_input_normalization of the conditional layer)
VARIANTS = {"dni": (False, "auto"), "cdni": (True, "layer"), "cdni-raw": (True, "auto")}


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(EXAMPLES, D_IN)).astype("float32")
    y = rng.integers(0, CLASSES, size=(EXAMPLES,)).astype("int64")
    return x, y


def dataset(x, y):
    """Global batches; `tf.distribute` slices each among the replicas."""
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return ds.with_options(options)


def build(conditional, normalization, seed):
    """The MLP, compiled, with random trainable weights.

    `M` starts at zero by default; random weights make the synthetic
    gradients nonzero from the first step, so that every update counts. A
    least-squares `M` (the default) is not trainable: it starts at zero and
    is fitted from the first batch on.
    """
    model = keras_dni.DNISequential(
        [
            keras.Input((D_IN,)),
            keras_dni.DNIDense(UNITS, activation="relu", name="d1"),
            keras_dni.DNIDense(
                UNITS,
                activation="relu",
                conditional=conditional,
                sg_input_normalization=normalization,
                name="d2",
            ),
            keras.layers.Dense(CLASSES, activation="softmax", name="out"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.5),
        loss="sparse_categorical_crossentropy",
        sg_optimizer=keras.optimizers.Adam(1e-2),
    )
    rng = np.random.default_rng(seed)
    for variable in model.trainable_variables:
        variable.assign(
            rng.normal(scale=0.3, size=variable.shape).astype(variable.dtype)
        )
    return model


def least_squares_weights(model):
    """Per entry of `model.weights`: whether it belongs to a least-squares
    gradient model (its weights or its solver state)."""
    ids = set()
    for layer in keras_dni.synthetic_gradient_layers(model):
        if layer.least_squares:
            ids.update(id(w) for w in layer.weights)
    return [id(w) in ids for w in model.weights]


def main(out_dir):
    x, y = data()
    results = {
        "replicas": np.asarray(STRATEGY.num_replicas_in_sync),
        # What `DNISequential` takes for multi-worker training (its Keras
        # workarounds are active only then).
        "multi_worker": np.asarray(keras_dni.models._is_multi_worker(STRATEGY)),
    }
    for seed, (variant, (conditional, normalization)) in enumerate(VARIANTS.items()):
        with STRATEGY.scope():
            model = build(conditional, normalization, seed)
        for i, weight in enumerate(model.get_weights()):
            results[f"{variant}/initial_{i}"] = weight
        history = model.fit(dataset(x, y), epochs=EPOCHS, verbose=0).history
        for i, weight in enumerate(model.get_weights()):
            results[f"{variant}/weight_{i}"] = weight
        results[f"{variant}/least_squares"] = np.asarray(
            least_squares_weights(model), "int8"
        )
        for key, values in history.items():
            results[f"{variant}/history/{key}"] = np.asarray(values, "float64")
        # Each gradient model's prediction on the training data.
        h = x
        for name in ("d1", "d2"):
            layer = model.get_layer(name)
            h = layer(h)
            results[f"{variant}/prediction/{name}"] = np.asarray(
                layer.synthetic_gradient.predict_gradient(h, y)
            )
    # `evaluate` (its `test_step`) across workers, once: tracing is the cost.
    results[f"{variant}/evaluate_loss"] = np.asarray(
        model.evaluate(dataset(x, y), verbose=0), "float64"
    )
    np.savez(os.path.join(out_dir, NAME + ".npz"), **results)


if __name__ == "__main__":
    main(sys.argv[1])
