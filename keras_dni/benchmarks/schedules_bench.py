"""The `schedules` task: peak memory of a training step, locked vs unlocked.

A deep MLP (`depth` hidden layers of `width`, ReLU, softmax output) trained
with backprop (`keras.Sequential`) and with plain DNI in a `DNISequential`
compiled with `schedule="locked"` and `schedule="unlocked"`. The DNI network
is split into `stages` stages of `depth / stages` layers: a `DNIDense` ends
each stage but the last, the other hidden layers are plain `Dense` (8 stages
of a depth-8 network: every hidden layer but the last is a decoupling
point, the last stage being the last hidden layer and the output layer).

Each configuration (method, stages, batch size) runs in a fresh process
(`multiprocessing` spawn, one configuration per process), which:

1. builds and compiles the model, predicts one batch and builds the
   optimizers (their slots are not training-step memory): the *baseline*;
2. trains one step with `fit` (the warm-up: tracing, graph optimisation);
3. trains `steps + 1` more steps with `fit` (the first is not timed).

Two measurements (see `docs/schedules.md`, "Memory"):

- `rss_peak_above_inference_mib`: the process's peak resident set size
  (`getrusage(RUSAGE_SELF).ru_maxrss`) after step 3 minus that at the
  baseline. It includes everything `fit` adds over inference: tracing the
  train step, graph optimisation, and the step's tensors.
- TensorFlow's allocator (`tf.config.experimental.get_memory_info("CPU:0")`;
  on CPU in TF 2.21 it counts only allocations of 256 KiB and more, those
  of oneDNN's allocator, and raises with `TF_ENABLE_ONEDNN_OPTS=0`, which
  the records then report as `tf_memory_info_error`): `tf_step_peak_mib`,
  the peak bytes in use during the `steps + 1` steps of 3 minus the bytes
  in use before them (what a training step allocates on top of the model
  and optimizer state: activations, gradients, temporaries), and
  `tf_peak_above_inference_mib`, the peak over 2 and 3 minus the bytes in
  use at the baseline.

For context the records carry the theoretical activation memory (sum over
layers of `batch * width * 4` bytes, the output layer included) of the whole
network and of the largest stage.
"""

import concurrent.futures
import gc
import multiprocessing
import os
import resource
import sys
import time

import numpy as np

SCHEDULE_METHODS = ("backprop", "locked", "unlocked")
INPUT_DIM = 784
OUTPUT_DIM = 10
MIB = 2.0**20


def decoupling_layers(depth, stages):
    """Indices of the hidden layers that are `DNIDense`, for `stages` stages.

    Stages of `depth // stages` hidden layers: a decoupling point after each
    stage but the last (whose end is the loss).
    """
    if stages < 1 or depth % stages:
        raise ValueError(
            f"Received an invalid number of stages: expected a divisor of the "
            f"depth {depth} (stages of equal depth). Received: stages={stages}"
        )
    per_stage = depth // stages
    return [per_stage * (k + 1) - 1 for k in range(stages - 1)]


def activation_bytes(batch_size, depth, width, stages):
    """Theoretical activations (float32): `(whole network, largest stage)`.

    The sum over layers of `batch * width * 4` bytes, the output layer
    counted in the last stage.
    """
    per_stage = depth // stages
    stage_widths = [[width] * per_stage for _ in range(stages)]
    stage_widths[-1].append(OUTPUT_DIM)
    sizes = [4 * batch_size * sum(w) for w in stage_widths]
    return sum(sizes), max(sizes)


def _build(method, depth, width, stages, sg_solver="auto"):
    """The MLP: `keras.Sequential` for backprop, else a `DNISequential` with
    a `DNIDense` (gradient models with `sg_solver`) ending each stage."""
    import keras

    import keras_dni

    if method == "backprop":
        dni = []
    else:
        dni = decoupling_layers(depth, stages)
    layers = [keras.Input((INPUT_DIM,))]
    for i in range(depth):
        if i in dni:
            layer = keras_dni.DNIDense(
                width, activation="relu", sg_solver=sg_solver, name=f"hidden_{i}"
            )
        else:
            layer = keras.layers.Dense(width, activation="relu", name=f"hidden_{i}")
        layers.append(layer)
    layers.append(keras.layers.Dense(OUTPUT_DIM, activation="softmax", name="output"))
    if method == "backprop":
        return keras.Sequential(layers), dni
    return keras_dni.DNISequential(layers), dni


def repeated_batch(batch_size):
    """Seeds Keras and returns `(x, dataset)`: one random batch of the MLP's
    inputs and labels, as an endless `tf.data.Dataset` of that batch."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((batch_size, INPUT_DIM), dtype=np.float32)
    y = rng.integers(0, OUTPUT_DIM, batch_size)
    return x, tf.data.Dataset.from_tensors((x, y)).repeat()


def _maxrss_bytes():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else 1024 * peak  # Linux: KiB


def _rss_bytes():
    """Current resident set size (Linux `/proc`), or `None`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return 1024 * int(line.split()[1])
    except OSError:
        pass
    return None


def _tf_memory(tf):
    """`get_memory_info("CPU:0")`, or the error's text if it raises."""
    try:
        return tf.config.experimental.get_memory_info("CPU:0"), None
    except (ValueError, RuntimeError) as error:
        return None, f"{type(error).__name__}: {error}"


def measure(config):
    """One configuration, in this process; returns its metrics (a dict).

    `config`: `method`, `batch_size`, `depth`, `width`, `stages`, `steps`
    and optionally `sg_solver` (default `"auto"`).
    Meant to run in a fresh process (`run_schedules` spawns one each).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    from keras_dni.benchmarks.runs import _StepTimer

    method, batch = config["method"], config["batch_size"]
    x, dataset = repeated_batch(batch)

    model, dni = _build(
        method,
        config["depth"],
        config["width"],
        config["stages"],
        sg_solver=config.get("sg_solver", "auto"),
    )
    compile_kwargs = {}
    if method != "backprop":
        compile_kwargs["schedule"] = method
    model.compile(
        keras.optimizers.Adam(1e-3),
        "sparse_categorical_crossentropy",
        **compile_kwargs,
    )
    model.predict(x, batch_size=batch, verbose=0)
    # The optimizers' slots exist before the baseline: they are state of
    # training, not memory of a step.
    if method == "backprop":
        model.optimizer.build(model.trainable_variables)
        solver = None
    else:
        model.make_train_function()  # builds both optimizers (DNITrainerMixin)
        sg = model.get_layer(f"hidden_{dni[0]}").synthetic_gradient if dni else None
        solver = (
            None
            if sg is None
            else ("least_squares" if sg.least_squares else "gradient")
        )
        if method == "unlocked" and len(model._dni_schedule.stages) != len(dni) + 1:
            raise AssertionError("the model does not have the stages it should")
    gc.collect()
    base_maxrss, base_rss = _maxrss_bytes(), _rss_bytes()
    tf_base, tf_error = _tf_memory(tf)
    if tf_error is None:
        tf.config.experimental.reset_memory_stats("CPU:0")

    model.fit(dataset, steps_per_epoch=1, epochs=1, shuffle=False, verbose=0)
    gc.collect()
    warm_maxrss, warm_rss = _maxrss_bytes(), _rss_bytes()
    tf_warm, _ = _tf_memory(tf)
    if tf_error is None:
        tf.config.experimental.reset_memory_stats("CPU:0")

    timer = _StepTimer()
    model.fit(
        dataset,
        steps_per_epoch=config["steps"] + 1,  # the first step is not timed
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[timer.callback],
    )
    peak_maxrss, peak_rss = _maxrss_bytes(), _rss_bytes()
    tf_steps, _ = _tf_memory(tf)

    whole, largest = activation_bytes(
        batch, config["depth"], config["width"], config["stages"]
    )
    if method == "backprop":
        largest = whole
    metrics = {
        "rss_peak_above_inference_mib": (peak_maxrss - base_maxrss) / MIB,
        "rss_warmup_peak_above_inference_mib": (warm_maxrss - base_maxrss) / MIB,
        "rss_baseline_peak_mib": base_maxrss / MIB,
        "rss_peak_mib": peak_maxrss / MIB,
        "activations_whole_mib": whole / MIB,
        "activations_largest_stage_mib": largest / MIB,
        "step_seconds": float(np.median(timer.times)) if timer.times else None,
    }
    if base_rss is not None:
        metrics["rss_baseline_current_mib"] = base_rss / MIB
        metrics["rss_after_warmup_current_mib"] = warm_rss / MIB
        metrics["rss_after_steps_current_mib"] = peak_rss / MIB
    if tf_error is None:
        metrics.update(
            {
                "tf_step_peak_mib": (tf_steps["peak"] - tf_warm["current"]) / MIB,
                "tf_warmup_peak_mib": (tf_warm["peak"] - tf_base["current"]) / MIB,
                "tf_peak_above_inference_mib": (
                    max(tf_warm["peak"], tf_steps["peak"]) - tf_base["current"]
                )
                / MIB,
                "tf_baseline_current_mib": tf_base["current"] / MIB,
                "tf_after_warmup_current_mib": tf_warm["current"] / MIB,
                "tf_after_steps_current_mib": tf_steps["current"] / MIB,
            }
        )
    else:
        metrics["tf_memory_info_error"] = tf_error
    return {
        "task": "schedules",
        "method": method,
        "seed": 0,
        "metrics": metrics,
        "config": {
            "batch_size": batch,
            "depth": config["depth"],
            "width": config["width"],
            "layers": [INPUT_DIM] + [config["width"]] * config["depth"] + [OUTPUT_DIM],
            "stages": 1 if method == "backprop" else config["stages"],
            "dni_layers": dni,
            "steps": config["steps"],
            "optimizer": "adam(1e-3)",
            "sg_solver": solver,
            "tf_threads": {
                "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
            },
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        },
    }


def run_schedules(
    methods=SCHEDULE_METHODS,
    batch_sizes=(128, 512),
    stage_counts=(2, 4, 8),
    depth=8,
    width=1024,
    steps=5,
    jobs=1,
    sg_solver="auto",
):
    """`measure` per configuration, each in a fresh spawned process.

    Backprop once per batch size, `locked` and `unlocked` per batch size and
    number of stages. `jobs` configurations at a time (1: one after the
    other, so that they do not compete for memory bandwidth and cores).
    Returns the records in configuration order.
    """
    for stages in stage_counts:
        decoupling_layers(depth, stages)  # checks the stage counts first
    configs = []
    for batch in batch_sizes:
        for method in methods:
            for stages in [1] if method == "backprop" else stage_counts:
                configs.append(
                    {
                        "method": method,
                        "batch_size": batch,
                        "depth": depth,
                        "width": width,
                        "stages": stages,
                        "steps": steps,
                        "sg_solver": sg_solver,
                    }
                )
    context = multiprocessing.get_context("spawn")
    start = time.time()
    records = [None] * len(configs)
    with concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=context, max_tasks_per_child=1
    ) as pool:
        futures = {pool.submit(measure, c): i for i, c in enumerate(configs)}
        for future in concurrent.futures.as_completed(futures):
            record = future.result()
            records[futures[future]] = record
            m, c = record["metrics"], record["config"]
            tf_peak = m.get("tf_step_peak_mib")
            print(
                f"schedules batch {c['batch_size']:4d} {record['method']:8s} "
                f"stages {c['stages']}: peak RSS above inference "
                f"{m['rss_peak_above_inference_mib']:7.1f} MiB, TF step peak "
                + ("n/a" if tf_peak is None else f"{tf_peak:7.1f} MiB"),
                flush=True,
            )
    print(f"schedules: {len(configs)} processes, {time.time() - start:.0f} s")
    return records


def _parse_ints(value, name):
    try:
        items = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        items = []
    if not items or any(i <= 0 for i in items):
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a comma-separated "
            f"list of positive integers. Received: {value!r}"
        )
    return items


def schedules_runs(task, args, methods):
    """The CLI's runner of `schedules`.

    `--methods`: `backprop` runs backprop, `dni` both schedules (`cdni` is
    not measured). `--small`: depth 4, width 16, the first batch size, 2
    steps.
    """
    chosen = [
        m
        for m in SCHEDULE_METHODS
        if (m == "backprop" and "backprop" in methods)
        or (m != "backprop" and "dni" in methods)
    ]
    batch_sizes = _parse_ints(args.batch_sizes, "--batch-sizes")
    stage_counts = _parse_ints(args.stages, "--stages")
    depth, width = args.depth, args.width
    steps = args.steps or 5
    if args.small:
        depth, width, batch_sizes = 4, 16, batch_sizes[:1]
        stage_counts = [s for s in stage_counts if depth % s == 0] or [2]
        steps = 2
    return run_schedules(
        chosen,
        batch_sizes=batch_sizes,
        stage_counts=stage_counts,
        depth=depth,
        width=width,
        steps=steps,
        jobs=args.jobs,
        sg_solver=args.sg_solver,
    )


def schedules_table(records):
    """Markdown table of `schedules` records: one row per configuration.

    Peak memory above inference (RSS) and TensorFlow's step peak, each with
    its ratio to `locked` at the same batch size and number of stages, and
    the theoretical activations of the whole network and the largest stage.
    """
    rows = [r for r in records if r["task"] == "schedules"]

    def key(r):
        return (r["config"]["batch_size"], r["config"]["stages"], r["method"])

    locked = {key(r)[:2]: r["metrics"] for r in rows if r["method"] == "locked"}

    def cell(r, name):
        value = r["metrics"].get(name)
        if value is None:
            return "n/a"
        ref = locked.get(key(r)[:2], {}).get(name)
        if r["method"] == "unlocked" and ref:
            return f"{value:.1f} (x{value / ref:.2f})"
        return f"{value:.1f}"

    lines = [
        "| batch | stages | method | peak RSS above inference MiB (/ locked) "
        "| TF step peak MiB (/ locked) | activations: network / largest stage MiB |",
        "|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(SCHEDULE_METHODS)}
    for r in sorted(
        rows, key=lambda r: (key(r)[0], key(r)[1], order.get(r["method"], 9))
    ):
        m = r["metrics"]
        stages = "-" if r["method"] == "backprop" else str(r["config"]["stages"])
        lines.append(
            f"| {r['config']['batch_size']} | {stages} | {r['method']} | "
            f"{cell(r, 'rss_peak_above_inference_mib')} | "
            f"{cell(r, 'tf_step_peak_mib')} | "
            f"{m['activations_whole_mib']:.1f} / "
            f"{m['activations_largest_stage_mib']:.1f} |"
        )
    return "\n".join(lines)
