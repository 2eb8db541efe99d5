"""Update schedules of `DNISequential`/`DNIModel`: stages and their updates.

A *stage* is the run of layers between two consecutive decoupling points (a
`SyntheticGradient`, or the one at the output of a `DNIDense`/`DNIConv2D`);
the last stage ends with the loss. `compile(schedule=...)` picks when the
stages run and update (see `docs/schedules.md`):

- `"locked"`: one forward and one backward pass over the whole model, then
  every update (the default; `keras_dni.models` runs it).
- `"unlocked"`: stage by stage. Stage `k` runs forward, is updated at once
  from its synthetic gradient, and only then stage `k + 1` runs, on the
  activation that stage `k` produced before its update. Stage `k + 1`'s
  backward pass gives the target of stage `k`'s gradient model.
- `"pipelined"`: all stages at once, each on its own batch. In step `t`
  stage `k` works on the batch that entered the network `k` steps earlier:
  its input is the activation that stage `k - 1` produced in step `t - 1`,
  held between steps with that batch's labels (`keras_dni.pipelined`, which
  runs this schedule's step with the helpers below). No stage waits
  for another within a step; every update is applied at the end of the
  step. The gradient at stage `k`'s input is the target of stage `k - 1`'s
  gradient model, one step after that model predicted it.

`update_probability=p` updates each stage (its network weights and the
gradient model at its output) with probability `p` per step, independently.

This module splits a model into stages (`split_stages`), holds a model's
schedule settings (`StageSchedule`) and runs the per-stage updates
(`unlocked_train_step`, `apply_by_stage`).
"""

import numbers

import keras
import tensorflow as tf

from keras_dni import context
from keras_dni.conv import DNIConv2D
from keras_dni.dense import DNIDense
from keras_dni.synthetic_gradient import SyntheticGradient

SCHEDULES = ("locked", "unlocked", "pipelined")


# ------------------------------------------------------------ validation
def check_schedule(schedule):
    if schedule not in SCHEDULES:
        raise ValueError(
            "Received an invalid value for `schedule`, expected one of "
            f"{list(SCHEDULES)}. Received: schedule={schedule!r}"
        )
    return schedule


def check_update_probability(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            "Received an invalid value for `update_probability`, expected a "
            f"float in (0, 1]. Received: update_probability={value!r}"
        )
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(
            "Received an invalid value for `update_probability`, expected a "
            f"float in (0, 1]. Received: update_probability={value!r}"
        )
    return float(value)


def check_stage_devices(value, schedule):
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(device, str) for device in value
    ):
        raise TypeError(
            "Received an invalid value for `stage_devices`, expected `None` "
            "or a list of device strings (e.g. `['/gpu:0', '/gpu:1']`), one "
            f"per stage. Received: stage_devices={value!r}"
        )
    if schedule == "locked":
        raise ValueError(
            "Received `stage_devices` with `schedule='locked'`, which runs the "
            "model as one forward and one backward pass. Use "
            "`schedule='unlocked'` or `'pipelined'` to place stages on "
            "devices. Received: "
            f"stage_devices={value!r}"
        )
    return list(value)


# ---------------------------------------------------------------- stages
class Stage:
    """One stage: how to run it, its network variables, its decoupling point.

    Attributes:
        call: `call(inputs)`, the stage's forward pass in training mode.
        layers: the layers of the stage (their `losses` are its
            regularisation terms).
        synthetic_gradient: the `SyntheticGradient` at the stage's output,
            `None` for the last stage.
        variables: the stage's trainable network variables (model order).
        gradient_model_variables: `synthetic_gradient.trainable_variables`.
        device: device string or `None`.
        output: the symbolic tensor the stage outputs (shape and dtype).
    """

    def __init__(self, call, layers, synthetic_gradient, output=None):
        self.call = call
        self.layers = layers
        self.synthetic_gradient = synthetic_gradient
        self.output = output
        self.variables = []
        self.gradient_model_variables = (
            list(synthetic_gradient.trainable_variables) if synthetic_gradient else []
        )
        self.device = None

    def losses(self):
        losses = [loss for layer in self.layers for loss in layer.losses]
        return tf.add_n(losses) if losses else None


def _output_synthetic_gradient(layer):
    """The `SyntheticGradient` at `layer`'s output, if it is a decoupling point."""
    if isinstance(layer, SyntheticGradient):
        return layer
    if isinstance(layer, (DNIDense, DNIConv2D)):
        return layer.synthetic_gradient
    return None


def _holds_inner_synthetic_gradient(layer):
    """Whether `layer` holds a `SyntheticGradient` not at its output."""
    if _output_synthetic_gradient(layer) is not None:
        return False
    if isinstance(getattr(layer, "synthetic_gradient", None), SyntheticGradient):
        return True
    for sub in getattr(layer, "layers", ()) or ():
        if isinstance(sub, SyntheticGradient) or _holds_inner_synthetic_gradient(sub):
            return True
        if _output_synthetic_gradient(sub) is not None:
            return True
    return False


def _check_no_inner(layer, schedule):
    if _holds_inner_synthetic_gradient(layer):
        raise ValueError(
            f"`schedule={schedule!r}` and `update_probability` need every "
            "decoupling point at the output of a top-level layer of the model "
            f"(`SyntheticGradient`, `DNIDense`, `DNIConv2D`), but layer "
            f"'{layer.name}' ({type(layer).__name__}) holds a "
            "`SyntheticGradient` inside it. Use `schedule='locked'` with "
            "`update_probability=1.0` for this model."
        )


def _sequential_stages(model, schedule):
    stages, current = [], []

    def run(layers):
        def call(inputs):
            for layer in layers:
                inputs = layer(inputs, training=True)
            return inputs

        return call

    for layer in model.layers:
        _check_no_inner(layer, schedule)
        current.append(layer)
        sg = _output_synthetic_gradient(layer)
        if sg is not None:
            stages.append(Stage(run(current), current, sg, _symbolic_output(layer)))
            current = []
    stages.append(Stage(run(current), current, None, _symbolic_output(model)))
    return stages


def _symbolic_output(layer):
    """`layer`'s symbolic output (a stage's output spec), or `None`."""
    try:
        outputs = tf.nest.flatten(getattr(layer, "outputs", None) or layer.output)
    except (AttributeError, ValueError):
        return None
    return outputs[0] if len(outputs) == 1 else None


def _functional_stages(model, schedule):
    """Splits a functional model at its decoupling points (a chain only)."""
    stage_of = {id(t): 0 for t in tf.nest.flatten(model.inputs)}
    producer = {}
    boundaries = []  # (decoupling layer, its output tensor)
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        _check_no_inner(layer, schedule)
        inputs = tf.nest.flatten(layer.input)
        stages = {stage_of.get(id(t)) for t in inputs}
        stages.discard(None)
        if len(stages) > 1:
            names = sorted({producer.get(id(t), "an input") for t in inputs})
            raise ValueError(
                f"`schedule={schedule!r}` and `update_probability` need a "
                "model whose graph is a chain of stages that passes each "
                "decoupling point as a single tensor, but layer "
                f"'{layer.name}' reads tensors of different stages (from "
                f"{names}): a connection skips a decoupling point."
            )
        stage = max(stages) if stages else 0
        sg = _output_synthetic_gradient(layer)
        outputs = tf.nest.flatten(layer.output)
        if sg is not None:
            if len(boundaries) != stage or len(outputs) != 1:
                raise ValueError(
                    f"`schedule={schedule!r}` and `update_probability` need a "
                    "model whose graph is a chain of stages that passes each "
                    "decoupling point as a single tensor, but the decoupling "
                    f"layer '{layer.name}' is not the only decoupling point "
                    f"between the previous one and the loss (stage {stage})."
                )
            boundaries.append((layer, outputs[0]))
            stage += 1
        for t in outputs:
            stage_of[id(t)] = stage
            producer[id(t)] = layer.name
    last = len(boundaries)
    for t in tf.nest.flatten(model.outputs):
        if stage_of.get(id(t), last) != last:
            raise ValueError(
                f"`schedule={schedule!r}` and `update_probability` need every "
                "model output after the last decoupling point, but the output "
                f"of layer '{producer.get(id(t))}' comes before it."
            )

    def submodel(inputs, outputs, name):
        try:
            return keras.Model(inputs, outputs, name=name)
        except ValueError as error:
            raise ValueError(
                f"`schedule={schedule!r}` and `update_probability` could not "
                f"cut model '{model.name}' into a chain of stages at "
                f"{[layer.name for layer, _ in boundaries]}: {error}"
            ) from error

    def run(stage_model):
        return lambda inputs: stage_model(inputs, training=True)

    stages = []
    inputs = model.input
    for i, (layer, tensor) in enumerate(boundaries):
        stage_model = submodel(inputs, tensor, f"{model.name}_stage_{i}")
        stages.append(
            Stage(
                run(stage_model),
                [stage_model],
                _output_synthetic_gradient(layer),
                tensor,
            )
        )
        inputs = tensor
    outputs = tf.nest.flatten(model.outputs)
    if len(outputs) == 1 and outputs[0] is inputs:
        # The model ends at its last decoupling point: the loss is the stage.
        stages.append(Stage(lambda h: h, [], None, inputs))
    else:
        stage_model = submodel(inputs, model.output, f"{model.name}_stage_{last}")
        stages.append(Stage(run(stage_model), [stage_model], None, model.output))
    return stages


def split_stages(model, main_variables, schedule):
    """Returns the `Stage`s of a built `DNISequential`/`DNIModel`.

    Args:
        model: the built model.
        main_variables: the model's trainable network variables (not the
            gradient models'), in model order.
        schedule: the schedule's name, for messages.

    Raises:
        ValueError: naming the first layer that keeps the model from being
            a chain of stages, or a layer whose variables fall in two stages.
    """
    if isinstance(model, keras.Sequential):
        stages = _sequential_stages(model, schedule)
    else:
        stages = _functional_stages(model, schedule)
    owner = {}
    for index, stage in enumerate(stages):
        sg_ids = {id(v) for v in stage.gradient_model_variables}
        for layer in stage.layers:
            for v in layer.trainable_variables:
                if id(v) in sg_ids:
                    continue
                if owner.setdefault(id(v), index) != index:
                    raise ValueError(
                        f"`schedule={schedule!r}` and `update_probability` "
                        "need every layer in one stage, but variable "
                        f"'{v.path}' is used in stages {owner[id(v)]} and "
                        f"{index} (a layer shared across a decoupling point)."
                    )
    for v in main_variables:
        # Variables of no layer (rare) go with the loss, in the last stage.
        stages[owner.get(id(v), len(stages) - 1)].variables.append(v)
    return stages


# ------------------------------------------------------ schedule settings
class StageSchedule:
    """A model's schedule settings, its stages and its random draws.

    A plain object (not tracked by Keras): the stage sub-models and the seed
    generator of the update draws are not part of the saved weights; the
    settings are saved in the compile config.
    """

    def __init__(self, schedule, stage_devices, update_probability):
        self.schedule = check_schedule(schedule)
        self.update_probability = check_update_probability(update_probability)
        self.stage_devices = check_stage_devices(stage_devices, self.schedule)
        self.stages = None
        # The `"pipelined"` schedule's held batches (`keras_dni.pipelined`).
        self.pipeline = None
        # Seeded from Keras' global seed (`keras.utils.set_random_seed`), so
        # `fit` is reproducible.
        self.seed_generator = (
            keras.random.SeedGenerator(name="dni_update_draws")
            if self.update_probability < 1.0
            else None
        )

    @property
    def per_stage(self):
        """Whether the step needs stages (anything but locked, p = 1)."""
        return self.schedule != "locked" or self.update_probability < 1.0

    def config(self):
        return {
            "schedule": self.schedule,
            "stage_devices": self.stage_devices,
            "update_probability": self.update_probability,
        }

    def prepare(self, model, main_variables):
        """Splits `model` into stages (once) and checks `stage_devices`."""
        if self.stages is not None or not self.per_stage:
            return
        stages = split_stages(model, main_variables, self.schedule)
        if self.stage_devices is not None:
            if len(self.stage_devices) != len(stages):
                raise ValueError(
                    "Received an invalid value for `stage_devices`, expected "
                    f"one device per stage: model '{model.name}' has "
                    f"{len(stages)} stages (decoupling points at "
                    f"{[s.synthetic_gradient.metric_prefix_name for s in stages[:-1]]}"
                    f"). Received: stage_devices={self.stage_devices!r}"
                )
            for stage, device in zip(stages, self.stage_devices):
                stage.device = device
        self.stages = stages

    def draw_masks(self):
        """One boolean per stage (update or not), or `None` when p = 1."""
        if self.seed_generator is None:
            return None
        draws = keras.random.uniform(
            (len(self.stages),), seed=self.seed_generator, dtype="float32"
        )
        flags = tf.convert_to_tensor(draws) < self.update_probability
        return tf.unstack(flags, num=len(self.stages))


# ---------------------------------------------------------------- updates
class _StepCounter:
    """Keeps `optimizer.iterations` at one increment per training step.

    `optimizer.apply` adds 1 to `iterations` per call; applying per stage
    would add one per stage and shift Adam's bias correction (and learning
    rate schedules) between the stages of one step. Every per-stage apply of
    a step sees the count at the start of the step; `finish` adds 1.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.start = tf.identity(tf.convert_to_tensor(optimizer.iterations))

    def apply(self, grads, variables, mask):
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        if not pairs:
            return
        grads, variables = (list(t) for t in zip(*pairs))
        if mask is None:
            self.optimizer.apply(grads, variables)
        else:

            def update():
                self.optimizer.apply(grads, variables)
                return tf.constant(True)

            tf.cond(mask, update, lambda: tf.constant(False))
        self.optimizer.iterations.assign(self.start)

    def finish(self):
        self.optimizer.iterations.assign(self.start + 1)


def _mask(masks, index):
    return None if masks is None else masks[index]


def apply_solver_fits(solver_fits, masks=None, stages=()):
    """Updates the gradient models' state after a locked step.

    Refits the least-squares `M`s and records the targets' norm of those
    trained by `sg_optimizer` (`prediction_clip`).

    Args:
        solver_fits: `(layer, moments, weight)` tuples that the backward
            pass left in the training context (`batch_moments`).
        masks: `None`, or one boolean tensor per stage: a gradient model's
            state is updated only if the stage it ends updates.
        stages: the `Stage`s, with `masks`.
    """
    mask_of = {}
    if masks is not None:
        for index, stage in enumerate(stages):
            if stage.synthetic_gradient is not None:
                mask_of[id(stage.synthetic_gradient)] = masks[index]
    for layer, moments, weight in solver_fits:
        mask = mask_of.get(id(layer))
        if mask is not None:
            weight = weight * tf.cast(mask, tf.float32)
        layer.update_from_moments(moments, weight)


def apply_by_stage(model, stages, masks, grads):
    """Locked schedule with `update_probability < 1`: per-stage updates.

    (The gradient models' own state: `apply_solver_fits`.)

    Args:
        model: the model (its `optimizer` and `sg_optimizer`).
        stages: its `Stage`s.
        masks: one boolean tensor per stage.
        grads: dict from `id(variable)` to its gradient (or `None`).
    """
    network = _StepCounter(model.optimizer)
    gradient_models = _StepCounter(model.sg_optimizer)
    for index, stage in enumerate(stages):
        mask = _mask(masks, index)
        network.apply([grads[id(v)] for v in stage.variables], stage.variables, mask)
        gradient_models.apply(
            [grads[id(v)] for v in stage.gradient_model_variables],
            stage.gradient_model_variables,
            mask,
        )
    network.finish()
    gradient_models.finish()


def _per_example_scale(h, loss_scale, replicas):
    """`loss_scale / global_batch`, as `SyntheticGradient.call` computes it."""
    global_batch = tf.cast(tf.shape(h)[0], tf.float32) * replicas
    scale = 1.0 if loss_scale is None else tf.cast(loss_scale, tf.float32)
    return scale / global_batch


def _regression(prediction, incoming, per_example_scale, replicas):
    """M's regression loss and its gradient w.r.t. `prediction`.

    The same formula as the backward pass of `SyntheticGradient`: the target
    is the per-example gradient `incoming / per_example_scale`, the loss the
    mean squared error over the global batch and the features.
    """
    target = tf.cast(incoming, tf.float32) / per_example_scale
    error = prediction - target
    local_batch = tf.cast(tf.shape(error)[0], tf.float32)
    elements = tf.cast(tf.size(error), tf.float32)
    features = elements / local_batch
    global_batch = local_batch * replicas
    d_prediction = 2.0 * error / (global_batch * features)
    local_loss = tf.reduce_sum(tf.square(error)) / elements
    return local_loss, d_prediction


def _prediction(records, sg):
    for layer, _, prediction in records:
        if layer is sg:
            return prediction
    raise ValueError(
        f"The decoupling point '{sg.metric_prefix_name}' was not called in "
        "its stage's forward pass."
    )


def _after(tensor, variables):
    """`tensor`, computed only once `variables` hold their updated values."""
    reads = [tf.convert_to_tensor(v) for v in variables]
    if not reads:
        return tensor
    with tf.control_dependencies(reads):
        return tf.nest.map_structure(tf.identity, tensor)


def _add(grads, more):
    return [
        m if g is None else (g if m is None else g + m) for g, m in zip(grads, more)
    ]


def _stage_pass(model, stage, index, h, x, y, sample_weight, ctx):
    """Forward and backward pass of one stage on `h` (in `ctx`).

    `x`, `y` and `sample_weight` go to `model.compute_loss` in the last
    stage (`x` may be `None`: the batch's inputs are not held).

    The stage's objective is the synthetic gradient at its output (plus its
    regularisation terms), or the loss for the last stage.

    Returns:
        A dict: `out` (the stage's output, `y_pred` for the last stage),
        `grads` (of the stage's variables), `grad_input` (the gradient at
        `h`, `None` for the first stage), and `prediction` and `scale`
        (`M`'s prediction at the output and the per-example scale) or
        `loss`.
    """
    optimizer = model.optimizer
    loss_scale = model._loss_scale()
    replicas = float(tf.distribute.get_strategy().num_replicas_in_sync)
    last = stage.synthetic_gradient is None
    result = {}
    # Persistent for the regularisation terms' second gradient.
    with tf.GradientTape(persistent=not last) as tape:
        inputs = tf.nest.flatten(h)
        if index:
            tape.watch(inputs)
        first_record = len(ctx.records)
        out = stage.call(h)
        if last:
            loss = model.compute_loss(
                x=x,
                y=y,
                y_pred=out,
                sample_weight=sample_weight,
                training=True,
            )
            objective = optimizer.scale_loss(loss)
            result["loss"] = loss
        else:
            regularization = stage.losses()
            if regularization is not None:
                regularization = optimizer.scale_loss(regularization)
    sources = stage.variables + (inputs if index else [])
    if last:
        grads = tape.gradient(objective, sources)
    else:
        sg = stage.synthetic_gradient
        prediction = _prediction(ctx.records[first_record:], sg)
        scale = _per_example_scale(out, loss_scale, replicas)
        synthetic = tf.cast(prediction * (sg.calibration_factor() * scale), out.dtype)
        grads = tape.gradient(out, sources, output_gradients=synthetic)
        if regularization is not None:
            extra = tape.gradient(regularization, stage.variables)
            grads = _add(grads, extra + [None] * (len(grads) - len(extra)))
        result.update(prediction=prediction, scale=scale)
    n = len(stage.variables)
    result.update(
        out=out,
        grads=list(grads[:n]),
        grad_input=grads[n] if index else None,
    )
    return result


def unlocked_train_step(model, stages, masks, x, y, sample_weight):
    """One `"unlocked"` training step; returns `(y_pred, loss)`.

    For each stage in order: forward from the previous stage's output (as
    it was produced, before that stage's update), gradient of the stage's
    objective (the synthetic gradient at its output, or the loss for the
    last stage) w.r.t. its variables and its input, update of the stage
    with the network optimizer, then update of the previous stage's gradient
    model with `sg_optimizer`, on the gradient at its input. The next stage
    starts only once both updates are applied.

    Between its stage's update and its refit, a gradient model holds
    nothing but the stage's output (which the next stage reads anyway):
    `M` is evaluated again on it at the refit, once the gradient from above
    has arrived (one more forward pass of `M` per decoupling point), rather
    than keeping its input and prediction alive through the next stage.
    """
    network = _StepCounter(model.optimizer)
    gradient_models = _StepCounter(model.sg_optimizer)
    # (sg layer, per-example scale, mask, h)
    pending = None
    h = x
    y_pred = loss = None
    with context.training_context(
        labels=y, loss_scale=model._loss_scale(), force_backprop=True
    ) as ctx:
        for index, stage in enumerate(stages):
            last = stage.synthetic_gradient is None
            mask = _mask(masks, index)
            with tf.device(stage.device):
                result = _stage_pass(model, stage, index, h, x, y, sample_weight, ctx)
                network.apply(result["grads"], stage.variables, mask)
                updated = list(stage.variables)
                if pending is not None:
                    _train_gradient_model(
                        gradient_models, pending, result["grad_input"], y
                    )
                    # The next stage also waits for the refit of the M
                    # below: until then, that M's input stays alive.
                    updated += pending[0].variables
                out = result["out"]
                if last:
                    y_pred, loss = out, result["loss"]
                else:
                    pending = (stage.synthetic_gradient, result["scale"], mask, out)
                    h = _after(out, updated)
    network.finish()
    gradient_models.finish()
    return y_pred, loss


def _train_gradient_model(counter, pending, incoming, labels):
    sg, scale, mask, h = pending
    if incoming is None:
        incoming = tf.zeros(tf.shape(h), tf.float32)
    # M's prediction again, as the forward pass computed it (M and the bound
    # of its prediction clip have not changed since), only once the
    # gradient from above exists: nothing of M's is held through the stage
    # above.
    with tf.control_dependencies([incoming]):
        h = tf.identity(h)
    labels = labels if sg.conditional else None
    with tf.GradientTape() as tape:
        prediction = sg._clip(sg.predict_gradient(h, labels))
    replicas = float(tf.distribute.get_strategy().num_replicas_in_sync)
    value, d_prediction = _regression(prediction, incoming, scale, replicas)
    sg.sg_loss_tracker.update_state(value, sample_weight=1.0)
    weight = 1.0 if mask is None else tf.cast(mask, tf.float32)
    target = tf.cast(incoming, tf.float32) / scale
    # As under "locked": whether or not the stage updates.
    sg.record_calibration(prediction, target)
    if sg.least_squares:
        del tape
        sg.fit_least_squares(sg.least_squares_features(h, labels), target, weight)
        return
    variables = list(sg.trainable_variables)
    grads = tape.gradient(prediction, variables, output_gradients=d_prediction)
    del tape
    sg.record_targets(target, weight)
    counter.apply(grads, variables, mask)
