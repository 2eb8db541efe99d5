"""The `"pipelined"` schedule: every stage at once, each on its own batch.

In step `t`, stage `k` works on the batch that entered the network `k` steps
earlier. Its input is the activation that stage `k - 1` produced in step
`t - 1`, held between steps, with that batch's labels and sample weights, in
a `Pipeline`. Within a step no stage reads anything another stage computes
in that step, so the stages run at the same time (each on its device from
`stage_devices`); all updates are applied at the end of the step:

- stage `k`'s network weights, from the synthetic gradient `M_k(h_k)` at its
  output (the loss for the last stage);
- `M_{k-1}`, the gradient model at stage `k`'s input, on the gradient that
  stage `k`'s backward pass sends to that input (its target), one step after
  `M_{k-1}` predicted the gradient for the same activation.

The first `K - 1` steps after the model is built fill the pipeline: a stage
whose input is not there yet does nothing. Loss and metrics are those of the
batch the last stage saw (none while filling). The held batches are not part
of the saved model: a loaded model starts with an empty pipeline.

Example:

>>> import keras, keras_dni
>>> model = keras_dni.DNISequential([
...     keras.Input((8,)),
...     keras_dni.DNIDense(16, activation="relu", conditional=True,
...                        name="hidden"),
...     keras.layers.Dense(3, activation="softmax"),
... ])
>>> model.compile("adam", "sparse_categorical_crossentropy",
...               schedule="pipelined")
>>> history = model.fit(keras.random.normal((64, 8)),
...                     keras.random.randint((64,), 0, 3),
...                     batch_size=16, epochs=2, verbose=0)
>>> sorted(history.history)
['loss', 'sg_loss', 'sg_loss_hidden']
"""

import tensorflow as tf

from keras_dni import context
from keras_dni import schedules


def _map(fn, *structures):
    """`tf.nest.map_structure`, with `None` (no labels, no weights) kept."""
    if structures[0] is None:
        return None
    return tf.nest.map_structure(fn, *structures)


class _Held:
    """One stage's input as held between steps (tf.Variables, any batch)."""

    def __init__(self, output, labels, sample_weight):
        self.h = self._variable(output.shape, output.dtype, "h")
        self.prediction = self._variable(output.shape, "float32", "prediction")
        self.labels = _map(lambda t: self._variable(t.shape, t.dtype, "labels"), labels)
        self.sample_weight = _map(
            lambda t: self._variable(t.shape, t.dtype, "sample_weight"),
            sample_weight,
        )
        self.valid = tf.Variable(False, trainable=False, name="pipeline_valid")
        # See `read`.
        self._read = tf.function(
            self._read_all, experimental_attributes={"_noinline": True}
        )
        self._write = tf.function(
            self._write_all, experimental_attributes={"_noinline": True}
        )

    @staticmethod
    def _variable(shape, dtype, name):
        shape = tf.TensorShape(shape)
        if shape.rank is None or not shape[1:].is_fully_defined():
            raise ValueError(
                "`schedule='pipelined'` holds activations and labels between "
                "steps and needs their shapes, except the batch size, when "
                f"the model is traced. Received {name} of shape {shape}."
            )
        empty = tf.zeros([0] + shape[1:].as_list(), dtype=dtype)
        return tf.Variable(
            empty,
            shape=tf.TensorShape([None]).concatenate(shape[1:]),
            trainable=False,
            name=f"pipeline_{name}",
        )

    # The batch size of what a `_Held` holds changes (the last batch of an
    # epoch), but Grappler, TensorFlow's graph optimiser, infers the shape of
    # a variable from the values assigned to it in the same function and
    # folds shape computations on its reads into constants. Reads and writes
    # therefore go through functions that it does not inline, so that it
    # never sees an assignment next to a read.
    def read(self):
        return self._read()

    def write(self, h, prediction, labels, sample_weight, valid):
        self._write(h, prediction, labels, sample_weight, valid)

    def _read_all(self):
        read = lambda v: tf.identity(tf.convert_to_tensor(v))  # noqa: E731
        return {
            "h": read(self.h),
            "prediction": read(self.prediction),
            "labels": _map(read, self.labels),
            "sample_weight": _map(read, self.sample_weight),
            "valid": read(self.valid),
        }

    def _write_all(self, h, prediction, labels, sample_weight, valid):
        self.h.assign(h)
        self.prediction.assign(prediction)
        _map(lambda v, t: v.assign(t), self.labels, labels)
        _map(lambda v, t: v.assign(t), self.sample_weight, sample_weight)
        self.valid.assign(valid)


class Pipeline:
    """What the pipelined schedule holds between steps, per stage `k >= 1`.

    Plain `tf.Variable`s, not tracked by Keras: they are not weights and are
    not saved. Created the first time the training step is traced (their
    shapes, except the batch size, come from the stages and the labels).
    """

    def __init__(self):
        self.held = None

    def slots(self, stages, labels, sample_weight):
        if self.held is None:
            held = []
            with tf.init_scope():
                for stage, previous in zip(stages[1:], stages[:-1]):
                    if previous.output is None:
                        raise ValueError(
                            "`schedule='pipelined'` needs the output shape of "
                            "every stage; the decoupling point "
                            f"'{previous.synthetic_gradient.metric_prefix_name}' "
                            "has none. Build the model with a `keras.Input`."
                        )
                    with tf.device(stage.device):
                        held.append(_Held(previous.output, labels, sample_weight))
            self.held = held
        return self.held


def _empty_like(spec, dtype=None):
    shape = tf.TensorShape(spec.shape)
    return tf.zeros([0] + shape[1:].as_list(), dtype=dtype or spec.dtype)


def _stage_in_step(model, stage, index, inputs, labels, sample_weight, valid):
    """Stage `index`'s pass on its held input, if there is one (`valid`).

    Returns `(grads, grad_input, out, prediction, loss)`; zeros (and empty
    tensors for `out` and `prediction`) when the stage has no input yet.
    """
    last = stage.synthetic_gradient is None

    def run():
        with context.training_context(
            labels=labels, loss_scale=None, force_backprop=True
        ) as ctx:
            result = schedules._stage_pass(
                model, stage, index, inputs, None, labels, sample_weight, ctx
            )
        grads = [
            tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
            for g, v in zip(result["grads"], stage.variables)
        ]
        grad_input = result["grad_input"]
        if grad_input is None:
            grad_input = tf.zeros_like(inputs)
        if last:  # no gradient model at the loss: no prediction
            prediction, loss = tf.zeros([0]), tf.cast(result["loss"], "float32")
        else:
            prediction, loss = result["prediction"], tf.zeros([])
        return grads, grad_input, result["out"], prediction, loss

    if index == 0:
        return run()

    def skip():
        grads = [tf.zeros_like(v) for v in stage.variables]
        if last:
            out, prediction = _empty_like(stage.output), tf.zeros([0])
        else:
            out = _empty_like(stage.output)
            prediction = _empty_like(stage.output, "float32")
        return grads, tf.zeros_like(inputs), out, prediction, tf.zeros([])

    return tf.cond(valid, run, skip)


def pipelined_train_step(model, dni_schedule, masks, x, y, sample_weight):
    """One `"pipelined"` training step.

    Returns:
        `(y_pred, loss, y, sample_weight)` of the batch the last stage saw
        (empty while the pipeline fills).
    """
    stages = dni_schedule.stages
    if dni_schedule.pipeline is None:
        dni_schedule.pipeline = Pipeline()
    slots = dni_schedule.pipeline.slots(stages, y, sample_weight)
    # Everything held from the last step, read before anything overwrites it.
    held = [None] + [slot.read() for slot in slots]
    reads = [t for t in tf.nest.flatten(held[1:]) if t is not None]
    true = tf.constant(True)  # the first stage always has its batch
    passes = []
    for index, stage in enumerate(stages):
        if index:
            inputs, labels = held[index]["h"], held[index]["labels"]
            weights, valid = held[index]["sample_weight"], held[index]["valid"]
        else:
            inputs, labels, weights, valid = x, y, sample_weight, true
        with tf.device(stage.device):
            passes.append(
                _stage_in_step(model, stage, index, inputs, labels, weights, valid)
            )

    # The updates, once every stage has read the weights it works with.
    network_updates, gradient_model_updates = [], []
    for index, stage in enumerate(stages):
        grads, grad_input, out, prediction, _ = passes[index]
        valid = held[index]["valid"] if index else None
        mask = _and(valid, schedules._mask(masks, index))
        network_updates.append((grads, stage.variables, mask))
        with tf.device(stage.device):
            if index:
                previous = held[index]
                sg = stages[index - 1].synthetic_gradient
                sg_mask = _and(previous["valid"], schedules._mask(masks, index - 1))
                update = _train_gradient_model(sg, previous, grad_input, sg_mask)
                if update is not None:
                    gradient_model_updates.append(update)
            if index + 1 < len(stages):
                labels = y if index == 0 else held[index]["labels"]
                weights = sample_weight if index == 0 else held[index]["sample_weight"]
                # Overwritten only once this step has read what it holds.
                with tf.control_dependencies(reads):
                    slots[index].write(
                        out,
                        prediction,
                        labels,
                        weights,
                        true if valid is None else valid,
                    )
    every_stage = None
    if masks is None:
        every_stage = tf.reduce_all(tf.stack([h["valid"] for h in held[1:]]))
    _apply(model, network_updates, gradient_model_updates, every_stage)
    last = (
        held[-1] if len(stages) > 1 else {"labels": y, "sample_weight": sample_weight}
    )
    y_pred, loss = passes[-1][2], passes[-1][4]
    return y_pred, loss, last["labels"], last["sample_weight"]


def _apply(model, network_updates, gradient_model_updates, every_stage):
    """Applies the step's updates: `(grads, variables, mask)` per stage.

    Per stage (a stage whose mask is false keeps its weights and optimizer
    slots), or, when `every_stage` is true (the pipeline is full and every
    stage updates), with one `apply` per optimizer: the same updates, but
    nothing orders one stage's update after another's.
    """
    pairs = [
        (model.optimizer, network_updates),
        (model.sg_optimizer, gradient_model_updates),
    ]

    def per_stage():
        for optimizer, updates in pairs:
            if updates:
                counter = schedules._StepCounter(optimizer)
                for grads, variables, mask in updates:
                    counter.apply(grads, variables, mask)
                counter.finish()
        return tf.constant(True)

    def at_once():
        for optimizer, updates in pairs:
            if updates:
                grads = [g for update in updates for g in update[0]]
                variables = [v for update in updates for v in update[1]]
                optimizer.apply(grads, variables)
        return tf.constant(True)

    for optimizer, updates in pairs:
        if not updates:
            # One count per step also for an optimizer that updates nothing
            # (every M refitted by least squares), as under "locked".
            optimizer.iterations.assign_add(1)
    if every_stage is None:
        per_stage()
    else:
        tf.cond(every_stage, at_once, per_stage)


def _and(valid, mask):
    """Both conditions (`None`: always true); `None` if both are `None`."""
    if valid is None or mask is None:
        return mask if valid is None else valid
    return tf.logical_and(valid, mask)


def _train_gradient_model(sg, held, incoming, mask):
    """Trains `M` at a stage's input on the gradient its backward pass sent.

    `held` is what the pipeline held for the stage: the activation `h` that
    `M` saw one step earlier, its labels and `M`'s prediction then (for the
    regression loss that `sg_loss_<layer>` reports). A least-squares `M` is
    refitted here; for one trained by `sg_optimizer`, returns its update
    `(grads, variables, mask)` (`None` otherwise).
    """
    h, labels, prediction = held["h"], held["labels"], held["prediction"]
    scale = schedules._per_example_scale(h, None, 1.0)
    value, _ = schedules._regression(prediction, incoming, scale, 1.0)
    sg.sg_loss_tracker.update_state(
        tf.where(held["valid"], value, 0.0),
        sample_weight=tf.cast(held["valid"], tf.float32),
    )
    target = tf.cast(incoming, tf.float32) / scale
    weight = tf.cast(mask, tf.float32)
    # As under "locked": whether or not the stage updates, once it has data.
    sg.record_calibration(prediction, target, tf.cast(held["valid"], tf.float32))
    if sg.least_squares:
        sg.fit_least_squares(sg.least_squares_features(h, labels), target, weight)
        return None
    variables = list(sg.trainable_variables)
    # M regresses its clipped prediction, as under "locked"; with today's
    # weights and the bound before this batch's target enters it.
    with tf.GradientTape() as tape:
        current = sg._clip(sg.predict_gradient(h, labels if sg.conditional else None))
    _, d_current = schedules._regression(current, incoming, scale, 1.0)
    grads = tape.gradient(current, variables, output_gradients=d_current)
    grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
    sg.record_targets(target, weight)
    return grads, variables, mask
