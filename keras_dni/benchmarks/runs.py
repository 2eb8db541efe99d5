"""Training runs: the MLP tasks, the copy task and the timing of a step.

Each task of the CLI has a runner here, `runner(task, args, methods)`: it
runs every method and seed of the task from the parsed and checked command
line (`cli.main`), prints each run as it finishes and returns the task's
records (`cli.RUNNERS` maps the task names to them).
"""

import concurrent.futures
import multiprocessing
import os
import time

import numpy as np

from keras_dni.benchmarks.models import ARCHS
from keras_dni.benchmarks.models import build_cnn
from keras_dni.benchmarks.models import build_mlp
from keras_dni.benchmarks.tasks import IMAGE_TASKS
from keras_dni.benchmarks.tasks import load_task
from keras_dni.benchmarks.tasks import scores_each_epoch

COPY_MAX_LENGTH = 64  # copy: the curriculum stops at this N


# ---------------------------------------------------------------- MLP tasks
def run_mlp(
    task,
    method,
    seed,
    epochs,
    small=False,
    batch_size=64,
    dni_layers=None,
    arch="mlp",
    sg_solver="auto",
    schedule="locked",
    update_probability=1.0,
    sg_input_normalization="auto",
    sg_prediction_clip="default",
    kernel_initializer=None,
    sg_calibration=False,
):
    """Trains one model; returns a results record.

    `sg_solver`, `sg_input_normalization`, `sg_prediction_clip` (a float,
    `None`, or `"default"`: the library's) and `sg_calibration` are the DNI
    layers';
    `kernel_initializer` that of the MLP's hidden layers (`None`: the
    layers' own defaults); `schedule` and
    `update_probability` go to the DNI models' `compile` (backprop ignores
    them).

    `dni_layers` is passed to `build_mlp` (`None`: all hidden layers).
    `arch="cnn"` trains `build_cnn` instead, for `IMAGE_TASKS`.
    """
    import keras

    if arch not in ARCHS:
        raise ValueError(
            f"Received an invalid value for `arch`, expected one of {list(ARCHS)}. "
            f"Received: arch={arch!r}"
        )
    x, y, xt, yt, kind = load_task(task, small=small)
    if arch == "cnn":
        if task not in IMAGE_TASKS or dni_layers is not None:
            raise ValueError(
                f"`arch='cnn'` applies to the tasks {list(IMAGE_TASKS)}, without "
                f"`dni_layers`. Received: task={task!r}, dni_layers={dni_layers!r}"
            )
        size = int(round(np.sqrt(x.shape[1])))
        x, xt = x.reshape(-1, size, size, 1), xt.reshape(-1, size, size, 1)
    keras.utils.set_random_seed(seed)
    if kind == "bits":
        out, act, loss = y.shape[1], "sigmoid", "binary_crossentropy"
    else:
        out, act, loss = 10, "softmax", "sparse_categorical_crossentropy"
    dni_kwargs = {
        "sg_solver": sg_solver,
        "sg_input_normalization": sg_input_normalization,
        "sg_calibration": sg_calibration,
    }
    if sg_prediction_clip != "default":
        dni_kwargs["sg_prediction_clip"] = sg_prediction_clip
    if arch == "cnn":
        if kernel_initializer is not None:
            raise ValueError(
                "`kernel_initializer` applies to the MLP (`arch='mlp'`). "
                f"Received: kernel_initializer={kernel_initializer!r}"
            )
        model = build_cnn(method, x.shape[1], out, dni_kwargs)
    else:
        model = build_mlp(
            method,
            x.shape[1],
            out,
            act,
            dni_layers=dni_layers,
            dni_kwargs=dni_kwargs,
            kernel_initializer=kernel_initializer,
        )
    dni = method != "backprop"
    schedule_kwargs = (
        {"schedule": schedule, "update_probability": update_probability} if dni else {}
    )
    model.compile(keras.optimizers.Adam(1e-3), loss, **schedule_kwargs)
    curve = []
    start = time.time()
    model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        verbose=0,
        callbacks=[scores_each_epoch(xt, yt, kind, curve)],
    )
    metrics = dict(curve[-1])
    metrics["train_seconds"] = time.time() - start
    main_key = "exact_accuracy" if kind == "bits" else "accuracy"
    metrics["curve"] = [c[main_key] for c in curve]
    if kind == "bits":
        metrics["bit_curve"] = [c["bit_accuracy"] for c in curve]
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "metrics": metrics,
        "config": {
            "epochs": epochs,
            "batch_size": batch_size,
            "arch": arch,
            "hidden": [32, 64] if arch == "cnn" else [256, 256, 256],
            "dni_layers": None if dni_layers is None else sorted(dni_layers),
            "optimizer": "adam(1e-3)",
            "sg_solver": sg_solver,
            "sg_input_normalization": sg_input_normalization,
            "sg_prediction_clip": sg_prediction_clip,
            "sg_calibration": sg_calibration,
            "kernel_initializer": kernel_initializer,
            "schedule": schedule if dni else "locked",
            "update_probability": update_probability if dni else 1.0,
            "train_size": len(x),
            "test_size": len(xt),
        },
    }


# ---------------------------------------------------------------- timing
def step_macs(layers, method, batch_size):
    """Multiply-adds of one training step of the timing MLP.

    Backprop: each layer's forward product and weight gradient, and the input
    gradient of every layer but the first. A linear gradient model `M` (one
    per hidden layer) adds its forward product and its weight gradient (its
    input is a constant to the backward pass); conditional DNI adds the same
    for the label projection. DNI computes every product backprop does,
    because the gradient arriving at each DNI layer is `M`'s target.
    """
    pairs = list(zip(layers[:-1], layers[1:]))
    macs = sum(2 * a * b for a, b in pairs) + sum(a * b for a, b in pairs[1:])
    if method != "backprop":
        labels = layers[-1] if method == "cdni" else 0
        macs += sum(2 * (w + labels) * w for w in layers[1:-1])
    return batch_size * macs


class _StepTimer:
    """Wall time of each training step of `fit` (between batch callbacks)."""

    def __init__(self):
        import keras

        timer = self

        class Callback(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                timer._start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                # The first step of each `fit` also starts the data iterator.
                if batch > 0:
                    timer.times.append(time.perf_counter() - timer._start)

        self.times = []
        self.callback = Callback()


def run_timing(
    widths,
    methods,
    repeats=10,
    steps=30,
    batch_size=128,
    jit_compile="auto",
    sg_solver="auto",
):
    """Median training-step time per method and width, measured in turns.

    Each method's model trains `repeats` times for `steps` steps in the
    stock compiled `fit`, the methods taking turns so that drifts of the
    machine hit all of them. A step's time is measured between Keras'
    batch callbacks (the compiled train function and Keras' per-step
    work), which leaves out what `fit` does once per call; the figure is the
    median over all steps. `sg_solver`: the DNI layers' (the multiply-add
    count leaves out the least-squares solve, about `(w + 1) ** 3 / 3`
    multiply-adds per DNI layer and step for a plain layer of width `w`).
    """
    import keras
    import tensorflow as tf

    records = []
    for width in widths:
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.random((batch_size * 8, 784), dtype=np.float32)
        y = rng.integers(0, 10, batch_size * 8)
        dataset = (
            tf.data.Dataset.from_tensor_slices((x, y))
            .batch(batch_size, drop_remainder=True)
            .repeat()
            .prefetch(2)
        )
        models, timers = {}, {}
        for method in methods:
            model = build_mlp(
                method,
                784,
                10,
                "softmax",
                width=width,
                depth=2,
                dni_kwargs={"sg_solver": sg_solver},
            )
            model.compile(
                keras.optimizers.Adam(1e-3),
                "sparse_categorical_crossentropy",
                jit_compile=jit_compile,
            )
            # Traces the step (`shuffle=False`: `fit` cannot shuffle a Dataset).
            model.fit(dataset, steps_per_epoch=5, epochs=1, shuffle=False, verbose=0)
            models[method] = model
            timers[method] = _StepTimer()
        for _ in range(repeats):
            for method in methods:  # alternate, so drifts hit all methods
                models[method].fit(
                    dataset,
                    steps_per_epoch=steps + 1,
                    epochs=1,
                    shuffle=False,
                    verbose=0,
                    callbacks=[timers[method].callback],
                )
        layers = [784, width, width, 10]
        base = float(np.median(timers[methods[0]].times))
        base_macs = step_macs(layers, methods[0], batch_size)
        for method in methods:
            median = float(np.median(timers[method].times))
            macs = step_macs(layers, method, batch_size)
            records.append(
                {
                    "task": "timing",
                    "method": method,
                    "seed": 0,
                    "metrics": {
                        "step_seconds": median,
                        "ratio_to_" + methods[0]: median / base,
                        "step_macs": macs,
                        "macs_ratio_to_" + methods[0]: macs / base_macs,
                    },
                    "config": {
                        "width": width,
                        "layers": layers,
                        "batch_size": batch_size,
                        "repeats": repeats,
                        "steps": steps,
                        "jit_compile": jit_compile,
                        "sg_solver": sg_solver,
                    },
                }
            )
            print(
                f"width {width:5d} {method:8s} {1000 * median:8.2f} ms/step"
                f"  x{median / base:.2f} (multiply-adds x{macs / base_macs:.2f})",
                flush=True,
            )
    return records


# ---------------------------------------------------------------- copy
def _copy_job(kwargs):
    """One copy-task training in a worker process, with one TF thread."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from keras_dni.benchmarks.copy_task import run_copy_task

    return kwargs, run_copy_task(**kwargs)


def run_copy(args, methods):
    """Copy-task runs (`copy_task.run_copy_task`) for the parsed CLI `args`.

    One run per truncation T in `args.truncations`, method (`backprop`:
    truncated BPTT, recorded as `bptt`; any other: DNI) and seed, the
    largest T first. Each run is printed as it finishes. With `args.jobs`
    above 1, that many runs train at a time, each in its own process with
    one TensorFlow thread (the largest T first packs them better);
    otherwise they train one after the other in this process. Returns the
    records sorted by T, seed and method.
    """
    from keras_dni.benchmarks.copy_task import DEFAULT_THRESHOLD
    from keras_dni.benchmarks.copy_task import run_copy_task

    truncations = sorted({int(t) for t in args.truncations.split(",")})
    steps = args.steps or (20 if args.small else 3000)
    # `DNIRNN`'s default (and `auto`): no normalisation.
    norm = "layer" if args.sg_input_normalization == "layer" else None
    jobs = [
        {
            "truncation": t,
            "synthetic_gradient": method not in ("backprop", "bptt"),
            "aux": method == "dni-aux",
            "steps": steps,
            "seed": seed,
            "units": args.units,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "sg_learning_rate": args.sg_learning_rate,
            "sg_input_normalization": norm,
            "start_length": args.start_length,
            "max_length": COPY_MAX_LENGTH,
            "sg_prediction_clip": recurrent_prediction_clip(args),
        }
        for t in reversed(truncations)
        for seed in seed_range(args)
        for method in methods
    ]
    records = []

    def finish(kwargs, result):
        method = "dni" if kwargs["synthetic_gradient"] else "bptt"
        method += "-aux" if kwargs["aux"] else ""
        config = {
            key: kwargs[key]
            for key in (
                "units",
                "batch_size",
                "learning_rate",
                "sg_learning_rate",
                "sg_input_normalization",
                "max_length",
                "sg_prediction_clip",
            )
        }
        records.append(
            {
                "task": "copy",
                "method": method,
                "seed": kwargs["seed"],
                "truncation": kwargs["truncation"],
                "metrics": result,
                "config": {
                    "steps": kwargs["steps"],
                    "start_length": result["start_length"],
                    **config,
                },
            }
        )
        print(
            f"copy T={kwargs['truncation']} {method:5s} seed {kwargs['seed']}: "
            f"max N {result['max_length']} ({result['seconds']:.0f} s)",
            flush=True,
        )

    start = time.time()
    if args.jobs > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            args.jobs, mp_context=context
        ) as pool:
            futures = [pool.submit(_copy_job, job) for job in jobs]
            for future in concurrent.futures.as_completed(futures):
                finish(*future.result())
    else:
        for job in jobs:
            finish(job, run_copy_task(**job))
    records.sort(key=lambda r: (r["truncation"], r["seed"], r["method"] != "bptt"))
    print(
        f"\nCopy task, largest N solved (< {DEFAULT_THRESHOLD} bits/step) in "
        f"{steps} steps, LSTM {args.units}, batch {args.batch_size}, Adam "
        f"{args.learning_rate:g} (M: {args.sg_learning_rate:g}), M input "
        f"normalization {norm}, curriculum from N={args.start_length}; "
        f"{time.time() - start:.0f} s in all.",
        flush=True,
    )
    return records


# ---------------------------------------------------------------- CLI runners
def prediction_clip_value(value):
    """A CLI `--(sg-)prediction-clip`: a float, `None` for `"none"`, or
    `"default"` (the library's)."""
    if value in ("default", "none"):
        return None if value == "none" else value
    return float(value)


def resolve_prediction_clip(value, default):
    """A parsed `prediction_clip_value`, with `"default"` replaced by `default`."""
    return default if value == "default" else value


def seed_range(args):
    """The seeds of the CLI's `--first-seed` and `--seeds`."""
    return range(args.first_seed, args.first_seed + args.seeds)


def recurrent_prediction_clip(args):
    """`DNIRNN`'s `sg_prediction_clip` for the CLI's `--sg-prediction-clip`."""
    from keras_dni.recurrent import RECURRENT_PREDICTION_CLIP

    return resolve_prediction_clip(args.sg_prediction_clip, RECURRENT_PREDICTION_CLIP)


def sg_input_normalization(value):
    """The `sg_input_normalization` of a CLI value (unset: `"auto"`)."""
    return {None: "auto", "none": None}.get(value, value)


def mlp_runs(task, args, methods):
    """The CLI's runner of an MLP task: `run_mlp` per method and seed."""
    epochs = args.epochs or (2 if args.small else 30)
    records = []
    for method in methods:
        for seed in range(args.seeds):
            record = run_mlp(
                task,
                method,
                seed,
                epochs,
                small=args.small,
                dni_layers=args.dni_layers,
                arch=args.arch,
                sg_solver=args.sg_solver,
                schedule=args.schedule,
                update_probability=args.update_probability,
                sg_input_normalization=sg_input_normalization(
                    args.sg_input_normalization
                ),
                sg_prediction_clip=args.sg_prediction_clip,
                kernel_initializer=args.kernel_initializer,
                sg_calibration=args.sg_calibration,
            )
            records.append(record)
            m = record["metrics"]
            acc = m.get("accuracy", m.get("exact_accuracy"))
            print(
                f"{task} {method:8s} seed {seed}: "
                f"test accuracy {100 * acc:.2f} % "
                f"({m['train_seconds']:.0f} s)",
                flush=True,
            )
    return records


def timing_runs(task, args, methods):
    """The CLI's runner of `timing`: `run_timing` over `args.widths`."""
    widths = [int(w) for w in args.widths.split(",")]
    if args.small:
        widths = widths[:1]
    return run_timing(
        widths,
        methods,
        repeats=2 if args.small else 10,
        steps=5 if args.small else 30,
        jit_compile=True if args.jit_compile else "auto",
        sg_solver=args.sg_solver,
    )


def copy_runs(task, args, methods):
    """The CLI's runner of `copy`: `run_copy`, without cDNI (no labels).

    With `--protocol stream`, `recurrent_runs.stream_runs` instead (one
    continuous stream of episodes per row, stateful `DNIRNN`).
    """
    methods = [m for m in methods if m != "cdni"]
    if getattr(args, "protocol", "episodes") == "stream":
        from keras_dni.benchmarks.recurrent_runs import stream_runs

        return stream_runs(task, args, methods)
    return run_copy(args, methods)
