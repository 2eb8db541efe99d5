"""The `throughput` task: examples per second of `"pipelined"` vs backprop.

The deep MLP of the `schedules` task (`depth` hidden layers of `width`, ReLU,
softmax output; `schedules_bench`), trained with `fit`:

- `backprop`: `keras.Sequential`, TensorFlow using every core inside each op
  (intra-op threads = `cores`, inter-op threads 1);
- `locked`: the DNI network (one decoupling point per stage) with
  `schedule="locked"`, threads as for backprop;
- `pipelined`: the same DNI network with `schedule="pipelined"`, one thread
  per op and one op per stage at a time (intra-op threads 1, inter-op
  threads = stages), so that the stages run side by side.

Thread settings are per process, so each measurement runs in a fresh
spawned process: `warmup` steps (tracing, graph optimisation, filling the
pipeline), then `steps` timed steps in one `fit` on a repeated in-memory
batch; the figure is the median step time. The methods are measured
alternately, `rounds` times over, and each round gives the ratio of
pipelined to backprop examples per second: the ratio holds even when the
machine's speed drifts between rounds.
"""

import concurrent.futures
import multiprocessing
import os
import time

import numpy as np

THROUGHPUT_METHODS = ("backprop", "locked", "pipelined")


def measure_throughput(config):
    """One configuration in this (fresh) process; returns its record.

    `config`: `method`, `batch_size`, `depth`, `width`, `stages`,
    `sg_solver`, `steps`, `warmup`, `cores`, `round`.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    method = config["method"]
    if method == "pipelined":
        intra, inter = 1, config["stages"]
    else:
        intra, inter = config["cores"], 1
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    import keras

    from keras_dni.benchmarks.runs import _StepTimer
    from keras_dni.benchmarks.schedules_bench import _build
    from keras_dni.benchmarks.schedules_bench import repeated_batch

    batch = config["batch_size"]
    _, dataset = repeated_batch(batch)
    model, _ = _build(
        "backprop" if method == "backprop" else "dni",
        config["depth"],
        config["width"],
        config["stages"],
        sg_solver=config["sg_solver"],
    )
    kwargs = {} if method == "backprop" else {"schedule": method}
    model.compile(
        keras.optimizers.Adam(1e-3),
        "sparse_categorical_crossentropy",
        jit_compile=False,
        **kwargs,
    )
    model.fit(
        dataset, steps_per_epoch=config["warmup"], epochs=1, shuffle=False, verbose=0
    )
    timer = _StepTimer()
    model.fit(
        dataset,
        steps_per_epoch=config["steps"] + 1,  # the first step is not timed
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[timer.callback],
    )
    step = float(np.median(timer.times))
    return {
        "task": "throughput",
        "method": method,
        "seed": 0,
        "metrics": {
            "step_seconds": step,
            "examples_per_second": batch / step,
        },
        "config": {
            **config,
            "tf_threads": {"intra_op": intra, "inter_op": inter},
            "jit_compile": False,
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        },
    }


def run_throughput(
    widths=(512, 1024),
    batch_sizes=(128, 256),
    stage_counts=(2,),
    depth=8,
    sg_solver="gradient",
    rounds=3,
    steps=30,
    warmup=5,
    methods=THROUGHPUT_METHODS,
):
    """`measure_throughput` for every configuration, alternately, `rounds`
    times; one process at a time (they must not compete for the cores)."""
    cores = os.cpu_count() or 1
    configs = []
    for r in range(rounds):
        for width in widths:
            for batch in batch_sizes:
                for stages in stage_counts:
                    for method in methods:
                        configs.append(
                            {
                                "method": method,
                                "batch_size": batch,
                                "depth": depth,
                                "width": width,
                                "stages": stages,
                                "sg_solver": sg_solver,
                                "steps": steps,
                                "warmup": warmup,
                                "cores": cores,
                                "round": r,
                            }
                        )
    context = multiprocessing.get_context("spawn")
    records = []
    start = time.time()
    for config in configs:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            record = pool.submit(measure_throughput, config).result()
        records.append(record)
        c, m = record["config"], record["metrics"]
        print(
            f"throughput round {c['round']} width {c['width']} batch "
            f"{c['batch_size']} stages {c['stages']} {record['method']:9s}: "
            f"{m['examples_per_second']:8.0f} examples/s "
            f"({1000 * m['step_seconds']:.1f} ms/step)",
            flush=True,
        )
    print(f"throughput: {len(configs)} processes, {time.time() - start:.0f} s")
    return records


def throughput_table(records):
    """Markdown table: median examples/s per method, ratio to backprop.

    The ratio of each round (pipelined / backprop, measured one after the
    other) is reported as the median over rounds, with its range.
    """
    rows = [r for r in records if r["task"] == "throughput"]
    if not rows:
        return ""

    def key(r):
        c = r["config"]
        return (c["width"], c["batch_size"], c["stages"], c["sg_solver"])

    methods = [m for m in THROUGHPUT_METHODS if any(r["method"] == m for r in rows)]
    lines = [
        "| width | batch | stages | M solver | "
        + " | ".join(f"{m} examples/s" for m in methods)
        + " | pipelined / backprop (median, range over rounds) |",
        "|---|---|---|---|" + "---|" * (len(methods) + 1),
    ]
    for k in dict.fromkeys(key(r) for r in rows):
        group = [r for r in rows if key(r) == k]
        cells = []
        for method in methods:
            values = [
                r["metrics"]["examples_per_second"]
                for r in group
                if r["method"] == method
            ]
            cells.append(f"{np.median(values):.0f}" if values else "—")
        by_round = {}
        for r in group:
            by_round.setdefault(r["config"]["round"], {})[r["method"]] = r["metrics"][
                "examples_per_second"
            ]
        ratios = [
            v["pipelined"] / v["backprop"]
            for v in by_round.values()
            if "pipelined" in v and "backprop" in v
        ]
        ratio = (
            f"x{np.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            if ratios
            else "—"
        )
        lines.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | "
            + " | ".join(cells)
            + f" | {ratio} |"
        )
    return "\n".join(lines)


def throughput_runs(task, args, methods):
    """The CLI's runner of `throughput`.

    `--widths`, `--batch-sizes`, `--stages`, `--depth`, `--sg-solver`
    (`auto`: least squares), `--steps` (timed steps, default 30), `--seeds`
    (the number of rounds). `--small`: width 32, depth 4,
    one batch size, one round of 3 steps. `--methods`: `backprop`, and `dni`
    for both DNI schedules.
    """
    from keras_dni.benchmarks.schedules_bench import _parse_ints

    chosen = [
        m
        for m in THROUGHPUT_METHODS
        if (m == "backprop" and "backprop" in methods)
        or (m != "backprop" and "dni" in methods)
    ]
    widths = _parse_ints(args.widths, "--widths")
    batch_sizes = _parse_ints(args.batch_sizes, "--batch-sizes")
    stage_counts = _parse_ints(args.stages, "--stages")
    depth, steps, rounds, warmup = args.depth, args.steps or 30, args.seeds, 5
    if args.small:
        widths, depth, batch_sizes, steps, warmup = [32], 4, batch_sizes[:1], 3, 2
        rounds = 1
        stage_counts = [s for s in stage_counts if depth % s == 0] or [2]
    return run_throughput(
        widths=widths,
        batch_sizes=batch_sizes,
        stage_counts=stage_counts,
        depth=depth,
        sg_solver=args.sg_solver,
        rounds=rounds,
        steps=steps,
        warmup=warmup,
        methods=chosen,
    )
