"""Callbacks for DNI training: gradient diagnostics and BP(lambda) schedules."""

import numbers

import keras
import numpy as np
import tensorflow as tf

from keras_dni import context
from keras_dni import validation
from keras_dni.models import DNITrainerMixin
from keras_dni.models import synthetic_gradient_layers


def _metric_name(layer):
    return layer.metric_prefix_name


class SyntheticGradientMonitor(keras.callbacks.Callback):
    """Compares synthetic gradients with the true backprop gradients.

    Every `every_n_batches` training batches, on the current batch and with
    the weights before that batch's update, the monitor runs one extra
    forward and backward pass with every DNI layer in exact-backprop mode and
    measures, per DNI layer, how the gradient the layer is trained with
    (`(1 - bp_lambda) * M(h) + bp_lambda * true`, i.e. the synthetic gradient
    for pure DNI) compares with the true gradient of the loss at `h`:

    - `sg_cosine_<layer>`: cosine similarity over the whole batch;
    - `sg_rel_error_<layer>`: `||used - true|| / ||true||`.

    Measurements are kept in `monitor.history` (a dict of lists of
    `(step, value)`), added to that batch's logs, and their mean over the
    epoch is added to the epoch logs, so `History` and `TensorBoard` (placed
    after the monitor) record them. It is a diagnostic: a measuring batch
    costs one full backprop more; other batches cost one predicate.

    Needs a `DNISequential`/`DNIModel` (their `train_step` runs it).

    Args:
        every_n_batches: positive int, measure every N training batches
            (counted over the whole run, from the first batch; with
            `steps_per_execution=k` Keras calls callbacks once per k
            batches, so N counts executions and the measurement is taken
            on the last batch of the execution).

    Example:

    >>> import keras, keras_dni
    >>> model = keras_dni.DNISequential([
    ...     keras.Input((8,)),
    ...     keras_dni.DNIDense(16, activation="relu", name="hidden"),
    ...     keras.layers.Dense(1),
    ... ])
    >>> model.compile("adam", "mse")
    >>> monitor = keras_dni.callbacks.SyntheticGradientMonitor(2)
    >>> _ = model.fit(keras.random.normal((64, 8)),
    ...               keras.random.normal((64, 1)), batch_size=16,
    ...               callbacks=[monitor], verbose=0)
    >>> len(monitor.history["sg_cosine_hidden"])
    2
    """

    def __init__(self, every_n_batches=100):
        super().__init__()
        if (
            not isinstance(every_n_batches, numbers.Integral)
            or isinstance(every_n_batches, bool)
            or every_n_batches <= 0
        ):
            raise ValueError(
                "Received an invalid value for `every_n_batches`, expected a "
                f"positive integer. Received: every_n_batches={every_n_batches!r}"
            )
        self.every_n_batches = int(every_n_batches)
        self.history = {}
        self._layers = []
        self._step = 0
        self._epoch_values = {}

    def get_config(self):
        return {"every_n_batches": self.every_n_batches}

    # --------------------------------------------------------------- hooks
    def on_train_begin(self, logs=None):
        if not isinstance(self.model, DNITrainerMixin):
            raise TypeError(
                "`SyntheticGradientMonitor` needs a `keras_dni.DNISequential` "
                "or `keras_dni.DNIModel`, whose `train_step` runs it. "
                f"Received a model of type {type(self.model).__name__}."
            )
        self._layers = synthetic_gradient_layers(self.model)
        with self.model.distribute_strategy.scope():
            self._flag = tf.Variable(
                False,
                trainable=False,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            self._values = tf.Variable(
                tf.zeros([len(self._layers), 2]),
                trainable=False,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        self.model._sg_monitor = self
        self.model.make_train_function(force=True)

    def on_train_end(self, logs=None):
        self.model._sg_monitor = None
        # Retrace without the monitor on the next `fit`.
        self.model.train_function = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_values = {}

    def on_train_batch_begin(self, batch, logs=None):
        self._measuring = self._step % self.every_n_batches == 0
        self._flag.assign(self._measuring)

    def on_train_batch_end(self, batch, logs=None):
        if self._measuring:
            values = np.asarray(self._values.numpy())
            for layer, (cosine, rel_error) in zip(self._layers, values):
                name = _metric_name(layer)
                for key, value in (
                    (f"sg_cosine_{name}", float(cosine)),
                    (f"sg_rel_error_{name}", float(rel_error)),
                ):
                    self.history.setdefault(key, []).append((self._step, value))
                    self._epoch_values.setdefault(key, []).append(value)
                    if logs is not None:
                        logs[key] = value
        self._step += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            for key, values in self._epoch_values.items():
                logs[key] = float(np.mean(values))

    # ------------------------------------------------- called by train_step
    def maybe_measure(self, model, x, y, sample_weight):
        """Adds the (conditional) measurement to the traced train step."""

        def measure():
            loss_scale = model._loss_scale()
            scale = 1.0 if loss_scale is None else loss_scale
            with context.training_context(
                labels=y, loss_scale=loss_scale, force_backprop=True
            ) as ctx:
                with tf.GradientTape() as tape:
                    y_pred = model(x, training=True)
                    loss = model.compute_loss(
                        x=x,
                        y=y,
                        y_pred=y_pred,
                        sample_weight=sample_weight,
                        training=True,
                    )
                    loss = loss * scale
            records = {id(layer): (out, pred) for layer, out, pred in ctx.records}
            outputs = [records[id(layer)][0] for layer in self._layers]
            grads = tape.gradient(loss, outputs)
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            rows = []
            for layer, grad in zip(self._layers, grads):
                out, pred = records[id(layer)]
                batch = tf.cast(tf.shape(out)[0] * replicas, tf.float32)
                true = tf.cast(grad, tf.float32) * batch / scale
                lam = tf.convert_to_tensor(layer.bp_lambda)
                used = (1.0 - lam) * pred + lam * true
                true_norm = tf.norm(true)
                cosine = tf.reduce_sum(used * true) / tf.maximum(
                    tf.norm(used) * true_norm, 1e-30
                )
                rel_error = tf.norm(used - true) / tf.maximum(true_norm, 1e-30)
                rows.append(tf.stack([cosine, rel_error]))
            self._values.assign(tf.stack(rows))
            return tf.constant(0)

        tf.cond(self._flag, measure, lambda: tf.constant(0))


class BPLambdaScheduler(keras.callbacks.Callback):
    """Sets every DNI layer's BP(lambda) at the start of each epoch.

    `bp_lambda` mixes the incoming (true or bootstrapped) gradient into the
    gradient a DNI layer sends below: 0 is pure DNI, 1 is exact backprop
    (Jaderberg et al., 2017, appendix A). The value used is added to the
    epoch logs as `bp_lambda`.

    Args:
        schedule: function `epoch -> float in [0, 1]` (epochs from 0).

    Example:

    >>> import keras_dni
    >>> # Backprop for two epochs, then pure DNI.
    >>> callback = keras_dni.callbacks.BPLambdaScheduler(
    ...     lambda epoch: 1.0 if epoch < 2 else 0.0)
    """

    def __init__(self, schedule):
        super().__init__()
        if not callable(schedule):
            raise TypeError(
                "Received an invalid value for `schedule`, expected a "
                f"function epoch -> float. Received: schedule={schedule!r}"
            )
        self.schedule = schedule
        self._value = None

    def on_epoch_begin(self, epoch, logs=None):
        value = validation.check_fraction(
            "bp_lambda (returned by the schedule)", self.schedule(epoch)
        )
        for layer in synthetic_gradient_layers(self.model):
            layer.bp_lambda.assign(value)
        self._value = value

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._value is not None:
            logs["bp_lambda"] = self._value


class BPLambdaWarmup(BPLambdaScheduler):
    """Warms up from backprop to DNI: lambda falls linearly from 1 to `final`.

    Epoch 0 uses `bp_lambda=1` (exact backprop, which also trains the
    gradient models on true gradients), epoch `warmup_epochs` and later use
    `final_lambda`.

    Args:
        warmup_epochs: positive int, length of the linear ramp.
        final_lambda: float in [0, 1], value after the ramp (0: pure DNI).

    Example:

    >>> import keras_dni
    >>> warmup = keras_dni.callbacks.BPLambdaWarmup(warmup_epochs=3)
    >>> [round(warmup.schedule(e), 3) for e in range(5)]
    [1.0, 0.667, 0.333, 0.0, 0.0]
    """

    def __init__(self, warmup_epochs, final_lambda=0.0):
        if (
            not isinstance(warmup_epochs, numbers.Integral)
            or isinstance(warmup_epochs, bool)
            or warmup_epochs <= 0
        ):
            raise ValueError(
                "Received an invalid value for `warmup_epochs`, expected a "
                f"positive integer. Received: warmup_epochs={warmup_epochs!r}"
            )
        final = validation.check_fraction("final_lambda", final_lambda)
        self.warmup_epochs = int(warmup_epochs)
        self.final_lambda = final

        def schedule(epoch):
            progress = min(1.0, epoch / self.warmup_epochs)
            return 1.0 + (final - 1.0) * progress

        super().__init__(schedule)
