"""`DNISequential` and `DNIModel`: Keras models whose `train_step` knows DNI.

The `train_step` opens a `keras_dni.context` around the forward and backward
pass (labels for conditional DNI, the loss scale for mixed precision), runs
one forward and one backward pass, and applies two optimizers: the model's
optimizer to the network's weights (updated from synthetic gradients) and
`sg_optimizer` to the gradient models (updated from their regression loss).
"""

import keras
import tensorflow as tf

from keras_dni import context
from keras_dni import pipelined
from keras_dni import schedules
from keras_dni.synthetic_gradient import SyntheticGradient

DEFAULT_SG_LEARNING_RATE = 1e-3


def default_sg_optimizer():
    """The default `sg_optimizer` (docs/design.md says why).

    It trains the gradient models fitted with `sg_solver="gradient"` (and
    those with hidden layers); linear ones are fitted by least squares.
    """
    return keras.optimizers.Adam(learning_rate=DEFAULT_SG_LEARNING_RATE)


def _is_multi_worker(strategy):
    """Whether `strategy` spans more than one worker process.

    True for a `tf.distribute.MultiWorkerMirroredStrategy` whose cluster (its
    `cluster_resolver`, from `TF_CONFIG` by default) has several `chief` and
    `worker` tasks (or several `evaluator`s, for an evaluator task): the case
    in which Keras 3 reduces across workers. Public APIs only; the same count
    as the strategy's own.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    resolver = strategy.cluster_resolver
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not cluster:
        return False
    if resolver.task_type == "evaluator":
        workers = len(cluster.get("evaluator", ()))
    else:
        workers = len(cluster.get("chief", ())) + len(cluster.get("worker", ()))
    return workers > 1


def synthetic_gradient_layers(model):
    """Returns every `SyntheticGradient` in `model`, in layer order.

    Looks inside nested models and inside DNI layers (which own a
    `SyntheticGradient` as `layer.synthetic_gradient`).
    """
    found = []

    def visit(layer):
        if isinstance(layer, SyntheticGradient):
            found.append(layer)
            return
        owned = getattr(layer, "synthetic_gradient", None)
        if isinstance(owned, SyntheticGradient):
            found.append(owned)
        for sub in getattr(layer, "layers", ()) or ():
            visit(sub)

    for layer in model.layers:
        visit(layer)
    return found


class _SyntheticGradientLoss(keras.metrics.Metric):
    """`sg_loss`: mean over DNI layers of their epoch-mean regression loss.

    Holds no state of its own: it reads the per-layer `sg_loss_<layer>`
    trackers (which Keras resets each epoch) of the layers that
    `layers_fn()` returns.
    """

    def __init__(self, layers_fn, name="sg_loss"):
        super().__init__(name=name)
        self._layers_fn = layers_fn

    def update_state(self, *args, **kwargs):
        pass

    def reset_state(self):
        pass

    def result(self):
        trackers = [
            layer.sg_loss_tracker
            for layer in self._layers_fn()
            if hasattr(layer, "sg_loss_tracker")
        ]
        if not trackers:
            return tf.constant(0.0)
        return tf.add_n([t.result() for t in trackers]) / len(trackers)


class DNITrainerMixin:
    """The DNI `train_step`, `compile(sg_optimizer=...)` and saving logic."""

    # ---------------------------------------------------------------- compile
    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        loss_weights=None,
        metrics=None,
        weighted_metrics=None,
        run_eagerly=False,
        steps_per_execution=1,
        jit_compile="auto",
        auto_scale_loss=True,
        sg_optimizer=None,
        schedule="locked",
        stage_devices=None,
        update_probability=1.0,
    ):
        """Configures the model for training (see `keras.Model.compile`).

        A *stage* is the run of layers between two consecutive decoupling
        points (a `SyntheticGradient`, or the one at the output of a
        `DNIDense`/`DNIConv2D`); the last stage ends with the loss. See
        `docs/schedules.md` for what runs when.

        Args:
            sg_optimizer: optimizer (instance or identifier) for the gradient
                models of the DNI layers. `None` gives
                `keras.optimizers.Adam(1e-3)`, the default measured in
                `keras_dni.benchmarks`. The model's `optimizer` updates every other
                weight, from the synthetic gradients.
            schedule: `"locked"` (default), `"unlocked"` or
                `"pipelined"`. `"locked"`: one forward and one backward
                pass over the whole model, then the updates. `"unlocked"`:
                stage by stage, each stage runs forward and is updated from
                its synthetic gradient before the next stage runs (on the
                activation it produced before its update); the gradient
                model at a stage's output is trained on the gradient that
                the next stage's backward pass sends it. `"pipelined"`:
                every stage at once, stage `k` on the batch that entered
                `k` steps earlier (its input activation and labels are held
                between steps); the first steps fill the pipeline, and loss
                and metrics are those of the batch the last stage saw. The
                per-stage schedules need a model that is a chain of stages
                (a `DNISequential`, or a `DNIModel` whose graph passes each
                decoupling point as a single tensor), `bp_lambda=0` and no
                loss scaling (`mixed_float16`); `"pipelined"` also runs
                without XLA (`jit_compile` `"auto"` means `False` there) and
                on one replica.
            stage_devices: `None` (default) or a list of device strings,
                one per stage: the per-stage schedules run each stage's
                forward pass, backward pass and update under
                `tf.device(device)`.
            update_probability: float in (0, 1], default 1. In each step
                each stage (its network weights and the gradient model at
                its output) is updated with this probability, independently
                of the others (the paper's asynchrony experiment); the draws
                come from a seed generator of the model, seeded by
                `keras.utils.set_random_seed`. `optimizer.iterations`
                counts steps, whether or not a stage was updated.
            Other arguments: as for `keras.Model.compile`.
        """
        sg_layers = synthetic_gradient_layers(self)
        if not sg_layers:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' has no DNI layer "
                "(`SyntheticGradient`, `DNIDense`, ...): nothing to decouple. "
                "Use `keras.Sequential`/`keras.Model` for plain backprop."
            )
        if sg_optimizer is None:
            sg_optimizer = default_sg_optimizer()
        dni_schedule = schedules.StageSchedule(
            schedule, stage_devices, update_probability
        )
        if dni_schedule.schedule != "locked":
            for layer in sg_layers:
                if layer.initial_bp_lambda != 0.0:
                    raise ValueError(
                        f"`schedule={schedule!r}` updates a stage before the "
                        "gradient from above exists, so it cannot mix it in: "
                        f"layer '{layer.metric_prefix_name}' has "
                        f"bp_lambda={layer.initial_bp_lambda}. Use "
                        "`bp_lambda=0` or `schedule='locked'`."
                    )
        if dni_schedule.schedule == "pipelined":
            if jit_compile is True:
                raise ValueError(
                    "`schedule='pipelined'` holds each stage's batch between "
                    "steps in variables whose batch size changes (the last "
                    "batch of an epoch), which XLA cannot compile. Use "
                    "`jit_compile=False` or `'auto'`. Received: "
                    f"jit_compile={jit_compile!r}"
                )
            jit_compile = False
            replicas = self.distribute_strategy.num_replicas_in_sync
            if replicas > 1:
                raise ValueError(
                    "`schedule='pipelined'` runs each stage on one device "
                    "(`stage_devices`), not on replicas of a distribution "
                    f"strategy; this model's strategy has {replicas} replicas. "
                    "Use `schedule='unlocked'` or `'locked'` with "
                    "`tf.distribute`."
                )
        sg_optimizer = keras.optimizers.get(sg_optimizer)
        if not isinstance(sg_optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "Received an invalid value for `sg_optimizer`, expected a "
                "Keras optimizer instance or identifier. Received: "
                f"sg_optimizer={sg_optimizer!r}"
            )
        super().compile(
            optimizer=optimizer,
            loss=loss,
            loss_weights=loss_weights,
            metrics=metrics,
            weighted_metrics=weighted_metrics,
            run_eagerly=run_eagerly,
            steps_per_execution=steps_per_execution,
            jit_compile=jit_compile,
            auto_scale_loss=auto_scale_loss,
        )
        if dni_schedule.per_stage and isinstance(
            self.optimizer, keras.optimizers.LossScaleOptimizer
        ):
            raise ValueError(
                "Loss scaling (`mixed_float16` or a `LossScaleOptimizer`) is "
                "supported only with `schedule='locked'` and "
                "`update_probability=1.0`. Received: "
                f"schedule={schedule!r}, update_probability={update_probability!r}"
            )
        self.sg_optimizer = sg_optimizer
        # A plain object, not tracked by Keras: nothing of it is a weight.
        self._dni_schedule = dni_schedule
        # Auto-tracked by Keras: listed in `model.metrics` after the loss.
        self._sg_total = _SyntheticGradientLoss(lambda: synthetic_gradient_layers(self))
        if self.built:
            self._configure_dni()

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is not None and getattr(self, "sg_optimizer", None):
            config["sg_optimizer"] = keras.optimizers.serialize(self.sg_optimizer)
            config.update(self._dni_schedule.config())
        return config

    def compile_from_config(self, config):
        config = dict(config)
        sg_optimizer = config.pop("sg_optimizer", None)
        schedule_config = {
            key: config.pop(key)
            for key in ("schedule", "stage_devices", "update_probability")
            if key in config
        }
        config = keras.saving.deserialize_keras_object(config)
        if sg_optimizer is not None:
            sg_optimizer = keras.optimizers.deserialize(sg_optimizer)
        self.compile(**config, sg_optimizer=sg_optimizer, **schedule_config)
        self._configure_dni()

    # ------------------------------------------------------------------ state
    def build(self, input_shape=None):
        super().build(input_shape)
        if getattr(self, "sg_optimizer", None) is not None:
            self._configure_dni()

    def _output_width(self):
        try:
            outputs = self.outputs
        except (AttributeError, ValueError):
            return None
        if not outputs or len(outputs) != 1:
            return None
        return outputs[0].shape[-1]

    def _configure_dni(self):
        """Sets conditional layers' label width, builds both optimizers."""
        width = self._output_width()
        for layer in synthetic_gradient_layers(self):
            if layer.conditional and layer.label_dim is None and width:
                layer.set_label_dim(int(width))
        if not self.built or not all(
            layer.built for layer in synthetic_gradient_layers(self)
        ):
            return
        # Build each optimizer on exactly the variables it updates, the same
        # way in `fit` and on loading, so that saved optimizer state matches.
        main, sg = self._dni_variables()
        with self.distribute_strategy.scope():
            if not self.optimizer.built:
                self.optimizer.build(main)
            if not self.sg_optimizer.built:
                self.sg_optimizer.build(sg)
        self._dni_schedule.prepare(self, main)

    def _dni_variables(self):
        """(network variables, gradient-model variables), by identity."""
        sg_ids = set()
        for layer in synthetic_gradient_layers(self):
            sg_ids.update(id(v) for v in layer.trainable_variables)
        main, sg = [], []
        for v in self.trainable_variables:
            (sg if id(v) in sg_ids else main).append(v)
        return main, sg

    def make_train_function(self, force=False):
        # The model and the optimizers' variables exist by now (`fit` built
        # them); create the sg optimizer's before tracing.
        self._configure_dni()
        return super().make_train_function(force=force)

    # ------------------------------------------------------------- train step
    def _loss_scale(self):
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            return self.optimizer.scale_loss(1.0)
        return None

    def train_step(self, data):
        return self._multi_worker_logs(self._dni_train_step(data))

    def _dni_train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        monitor = getattr(self, "_sg_monitor", None)
        if monitor is not None:
            monitor.maybe_measure(self, x, y, sample_weight)
        dni_schedule = self._dni_schedule
        masks = dni_schedule.draw_masks()
        if dni_schedule.schedule == "unlocked":
            y_pred, loss = schedules.unlocked_train_step(
                self, dni_schedule.stages, masks, x, y, sample_weight
            )
            self._track_loss(loss, x)
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if dni_schedule.schedule == "pipelined":
            # Loss and metrics of the batch that the last stage saw.
            y_pred, loss, y, sample_weight = pipelined.pipelined_train_step(
                self, dni_schedule, masks, x, y, sample_weight
            )
            self._track_loss(loss, y_pred)
            return self.compute_metrics(None, y, y_pred, sample_weight=sample_weight)
        loss_scale = self._loss_scale()
        with context.training_context(labels=y, loss_scale=loss_scale) as ctx:
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(
                    x=x,
                    y=y,
                    y_pred=y_pred,
                    sample_weight=sample_weight,
                    training=True,
                )
                scaled_loss = self.optimizer.scale_loss(loss)
        main_vars, sg_vars = self._dni_variables()
        grads = tape.gradient(scaled_loss, main_vars + sg_vars)
        if masks is not None:
            by_variable = {id(v): g for v, g in zip(main_vars + sg_vars, grads)}
            schedules.apply_by_stage(self, dni_schedule.stages, masks, by_variable)
            schedules.apply_solver_fits(ctx.solver_fits, masks, dni_schedule.stages)
            self._track_loss(loss, x)
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        self.optimizer.apply(grads[: len(main_vars)], main_vars)
        # A gradient model can get no gradient in a step (e.g. a `DNIRNN`
        # whose sequences fit in one chunk): leave it out of the update.
        sg_pairs = [
            (g, v) for g, v in zip(grads[len(main_vars) :], sg_vars) if g is not None
        ]
        if sg_pairs:
            self.sg_optimizer.apply(*zip(*sg_pairs))
        else:
            # One count per step, as under the other schedules, also when
            # every M is refitted by least squares.
            self.sg_optimizer.iterations.assign_add(1)
        # The gradient models' own state (least-squares fits, targets' norm).
        schedules.apply_solver_fits(ctx.solver_fits)
        self._track_loss(loss, x)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def test_step(self, data):
        return self._multi_worker_logs(self._dni_test_step(data))

    def _dni_test_step(self, data):
        # `M` is not trained in evaluation: its regression losses have no
        # value there, so they stay out of `evaluate`'s logs and out of the
        # `val_*` entries that `fit(validation_data=...)` records.
        logs = super().test_step(data)
        names = {self._sg_total.name} | {
            layer.sg_loss_tracker.name
            for layer in synthetic_gradient_layers(self)
            if hasattr(layer, "sg_loss_tracker")
        }
        return {key: value for key, value in logs.items() if key not in names}

    # ----------------------------------------------------------- multi-worker
    # Keras 3.15 `fit`/`evaluate` fail under a multi-worker
    # `MultiWorkerMirroredStrategy` for every model (keras-team/keras#20585):
    # `_maybe_symbolic_build` and the reduction of the step's logs. The two
    # methods below work around both; outside multi-worker training (one
    # device, `MirroredStrategy`, a one-worker cluster) they change nothing.
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Overrides a private Keras method, a necessary evil: Keras reduces
        # the first distributed batch with one `strategy.reduce("MEAN", ...)`
        # on the whole `(x, y)` structure, which MultiWorkerMirroredStrategy
        # rejects ("Attempt to convert a value (PerReplica...)"). The build
        # needs shapes only: give it the first local replica's batch, taken
        # from the iterator as Keras takes it.
        strategy = self._distribute_strategy
        if iterator is not None and data_batch is None and _is_multi_worker(strategy):
            for _, _, batches in iterator:
                data_batch = keras.tree.map_structure(
                    lambda v: (
                        strategy.experimental_local_results(v)[0]
                        if isinstance(v, tf.distribute.DistributedValues)
                        else v
                    ),
                    next(batches),
                )
                iterator = None
                break
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _multi_worker_logs(self, logs):
        # Across workers Keras averages each log with
        # `strategy.reduce("MEAN", value, axis=0)`, which fails on scalars
        # ("Invalid reduction dimension 0 for input with 0 dimensions"): give
        # every log a leading axis of length 1, whose mean over the workers'
        # replicas is the mean of the values. Returns `logs` itself otherwise.
        if not _is_multi_worker(self.distribute_strategy):
            return logs
        return keras.tree.map_structure(lambda v: tf.expand_dims(v, 0), logs)

    def _track_loss(self, loss, x):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        batch = tf.shape(tf.nest.flatten(x)[0])[0]
        for metric in super().metrics:
            if metric.name == "loss":
                metric.update_state(loss * replicas, sample_weight=batch)
                break


@keras.saving.register_keras_serializable(package="keras_dni")
class DNISequential(DNITrainerMixin, keras.Sequential):
    """A `keras.Sequential` whose `train_step` trains DNI layers in full.

    Drop-in for `keras.Sequential`. Compared with a plain `Sequential` (where
    DNI layers already train, with one optimizer), it adds:

    - `compile(..., sg_optimizer=...)`: the gradient models get an optimizer
      of their own; the model's optimizer updates the network from the
      synthetic gradients.
    - conditional DNI (`conditional=True` layers see the batch's labels);
    - mixed precision (`mixed_float16`): the loss scale is removed from the
      gradient models' targets;
    - the `sg_loss` metric (mean of the per-layer `sg_loss_<layer>`), in
      the training logs only: `evaluate` (and `val_*` in `fit`) leaves them
      out, since the gradient models are not trained there;
    - `keras_dni.callbacks.SyntheticGradientMonitor` support.

    One forward and one backward pass per step, as for backprop.

    Example:

    >>> import keras, keras_dni
    >>> model = keras_dni.DNISequential([
    ...     keras.Input((8,)),
    ...     keras_dni.DNIDense(32, activation="relu", conditional=True),
    ...     keras.layers.Dense(3, activation="softmax"),
    ... ])
    >>> model.compile("adam", "sparse_categorical_crossentropy",
    ...               sg_optimizer=keras.optimizers.Adam(1e-4))
    >>> history = model.fit(keras.random.normal((64, 8)),
    ...                     keras.random.randint((64,), 0, 3), verbose=0)
    >>> "sg_loss" in history.history
    True
    """


@keras.saving.register_keras_serializable(package="keras_dni")
class DNIModel(DNITrainerMixin, keras.Model):
    """A functional `keras.Model` whose `train_step` trains DNI layers.

    Same constructor as `keras.Model(inputs, outputs)`; see `DNISequential`
    for what its `train_step` adds.

    Example:

    >>> import keras, keras_dni
    >>> inputs = keras.Input((8,))
    >>> h = keras_dni.DNIDense(32, activation="relu")(inputs)
    >>> outputs = keras.layers.Dense(1)(h)
    >>> model = keras_dni.DNIModel(inputs, outputs)
    >>> model.compile("adam", "mse")
    >>> _ = model.fit(keras.random.normal((64, 8)),
    ...               keras.random.normal((64, 1)), verbose=0)
    """
