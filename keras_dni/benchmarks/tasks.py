"""The MLP tasks: their data (`data`) and how a prediction is scored."""

MLP_TASKS = ("digits", "mnist5k", "mnist1d", "binary-addition")
IMAGE_TASKS = ("digits", "mnist5k")


def load_task(task, small=False):
    """Returns `(x, y, x_test, y_test, kind)` for an MLP task."""
    from keras_dni.benchmarks import data

    if task == "binary-addition":
        n, n_test = (1000, 200) if small else (10000, 2000)
        (x, y), (xt, yt) = data.binary_addition(12, n, n_test, seed=0)
        kind = "bits"
    else:
        loader = {
            "digits": data.digits,
            "mnist5k": data.mnist5k,
            "mnist1d": data.mnist1d,
        }[task]
        (x, y), (xt, yt) = loader()
        kind = "classes"
    if small:
        x, y, xt, yt = x[:512], y[:512], xt[:256], yt[:256]
    return x, y, xt, yt, kind


def scores_each_epoch(x_test, y_test, kind, scores):
    """A callback that appends `_score` on the held-out set after each epoch."""
    import keras

    class Evaluate(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            pred = self.model.predict(x_test, batch_size=1024, verbose=0)
            scores.append(_score(pred, y_test, kind))

    return Evaluate()


def _score(pred, y, kind):
    if kind == "bits":
        right = (pred > 0.5) == (y > 0.5)
        return {
            "bit_accuracy": float(right.mean()),
            "exact_accuracy": float(right.all(axis=1).mean()),
        }
    return {"accuracy": float((pred.argmax(axis=1) == y).mean())}
