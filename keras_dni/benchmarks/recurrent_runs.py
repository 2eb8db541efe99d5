"""CLI runners of the recurrent stream tasks: `copy --protocol stream`,
`repeat-copy` and `charlm` (truncated BPTT, DNI and DNI + Aux).

Each run is one `streams.run_stream_task` or `charlm.run_charlm`; with
`--jobs` above 1 that many train at a time, each in its own process with one
TensorFlow thread. Each finished run is printed and appended to
`OUT/<task>.jsonl` at once, so a long command leaves its finished runs
behind if it is stopped. Besides the records (`results.json`), each task
writes its table (printed) and a plot, `OUT/<task>.png` (`copy` records are
tabled and plotted by `report` as before).
"""

import concurrent.futures
import json
import multiprocessing
import os
import time

import numpy as np

from keras_dni.benchmarks import runs

# Tasks whose methods are those of `streams.RECURRENT_METHODS`.
RECURRENT_TASKS = ("copy", "repeat-copy", "charlm")
METHOD_NAMES = ("bptt", "dni", "dni-aux", "backprop")  # backprop = bptt


def _one_thread():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def _job(kind, kwargs):
    """One training run (in a worker process, or in this one)."""
    if kind == "charlm":
        from keras_dni.benchmarks.charlm import run_charlm

        return kind, kwargs, run_charlm(**kwargs)
    from keras_dni.benchmarks.streams import run_stream_task

    return kind, kwargs, run_stream_task(**kwargs)


def _worker_job(kind, kwargs):
    _one_thread()
    return _job(kind, kwargs)


def _run_all(kind, jobs, n_jobs, finish):
    if n_jobs > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(n_jobs, mp_context=context) as pool:
            futures = [pool.submit(_worker_job, kind, job) for job in jobs]
            for future in concurrent.futures.as_completed(futures):
                finish(*future.result()[1:])
    else:
        for job in jobs:
            finish(*_job(kind, job)[1:])


def _truncations(args):
    return sorted({int(t) for t in args.truncations.split(",")})


def _canonical(method):
    return "bptt" if method == "backprop" else method


def _append(out, task, record):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{task}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def stream_runs(task, args, methods):
    """`copy` (with `--protocol stream`) and `repeat-copy` on the stream protocol."""
    from keras_dni.benchmarks.copy_task import first_truncated_length
    from keras_dni.benchmarks.streams import copy_curriculum

    steps = args.steps or (20 if args.small else 10000)
    chunks = args.chunks or 1
    methods = list(dict.fromkeys(_canonical(m) for m in methods))

    def stages(t):
        """Copy: from `--start-length` ('auto': ceil(T / 2)); repeat copy: default."""
        if task != "copy":
            return None
        start = args.start_length
        start = first_truncated_length(t) if start == "auto" else start
        return copy_curriculum(start, 64)

    jobs = [
        {
            "task": task,
            "stages": stages(t),
            "truncation": t,
            "method": method,
            "steps": steps,
            "seed": seed,
            "chunks": chunks,
            "units": args.units,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "sg_learning_rate": args.sg_learning_rate,
            "stream_discount": args.stream_discount,
            "sg_states": args.sg_states,
            "sg_prediction_clip": runs.recurrent_prediction_clip(args),
            "aux_weight": args.aux_weight,
            "log_every": max(steps // 20, 1),
        }
        for t in reversed(_truncations(args))
        for seed in runs.seed_range(args)
        for method in methods
    ]
    records = []

    def finish(kwargs, result):
        config = {
            key: kwargs[key]
            for key in (
                "steps",
                "chunks",
                "units",
                "batch_size",
                "learning_rate",
                "sg_learning_rate",
                "stream_discount",
                "sg_states",
                "sg_prediction_clip",
                "aux_weight",
            )
        }
        record = {
            "task": task,
            "method": kwargs["method"],
            "seed": kwargs["seed"],
            "truncation": kwargs["truncation"],
            "metrics": result,
            "config": {
                "protocol": "stream",
                "truncation": kwargs["truncation"],
                **config,
            },
        }
        if kwargs["stages"] is not None:
            record["config"]["start_length"] = kwargs["stages"][0][0]
        records.append(record)
        _append(args.out, task, record)
        print(
            f"{task} (stream) T={kwargs['truncation']} {kwargs['method']:7s} seed "
            f"{kwargs['seed']}: max length {result['max_length']} (stage "
            f"{result['stage']}, {result['seconds']:.0f} s)",
            flush=True,
        )

    start = time.time()
    _run_all("stream", jobs, args.jobs, finish)
    records.sort(key=lambda r: (r["truncation"], r["seed"], r["method"]))
    print(f"\n{task} (stream): {time.time() - start:.0f} s in all.", flush=True)
    if task != "copy":
        print(length_table(records))
        _plot(records, args.out, task, "max_length", "largest output length solved")
    return records


def charlm_runs(task, args, methods):
    """`charlm`: `charlm.run_charlm` per truncation, method and seed."""
    steps = args.steps or (20 if args.small else 3000)
    methods = list(dict.fromkeys(_canonical(m) for m in methods))
    text = None
    if args.small:
        from keras_dni.benchmarks.charlm import load_text

        text = load_text()[:20000]
    jobs = [
        {
            "truncation": t,
            "method": method,
            "steps": steps,
            "seed": seed,
            "chunks": args.chunks,
            "units": args.units,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "sg_learning_rate": args.sg_learning_rate,
            "stream_discount": args.stream_discount,
            "sg_states": args.sg_states,
            "sg_prediction_clip": runs.recurrent_prediction_clip(args),
            "aux_weight": args.aux_weight,
            "eval_every": args.eval_every or (10 if args.small else 250),
            "patience": args.patience,
            "text": text,
        }
        for t in reversed(_truncations(args))
        for seed in runs.seed_range(args)
        for method in methods
    ]
    records = []

    def finish(kwargs, result):
        config = {
            key: kwargs[key]
            for key in (
                "steps",
                "units",
                "batch_size",
                "learning_rate",
                "sg_learning_rate",
                "stream_discount",
                "sg_states",
                "sg_prediction_clip",
                "aux_weight",
                "eval_every",
                "patience",
            )
        }
        config["chunks"] = result["chunks"]
        config["text"] = "pydoc_data.topics" + (" (first 20,000)" if text else "")
        record = {
            "task": "charlm",
            "method": kwargs["method"],
            "seed": kwargs["seed"],
            "truncation": kwargs["truncation"],
            "metrics": result,
            "config": {"truncation": kwargs["truncation"], **config},
        }
        records.append(record)
        _append(args.out, "charlm", record)
        print(
            f"charlm T={kwargs['truncation']} {kwargs['method']:7s} seed "
            f"{kwargs['seed']}: test {result['test_bpc']:.3f} BPC (valid "
            f"{result['valid_bpc']:.3f} at step {result['best_step']}; "
            f"{result['seconds']:.0f} s)",
            flush=True,
        )

    start = time.time()
    _run_all("charlm", jobs, args.jobs, finish)
    records.sort(key=lambda r: (r["truncation"], r["seed"], r["method"]))
    print(f"\ncharlm: {time.time() - start:.0f} s in all.", flush=True)
    print(bpc_table(records))
    _plot(records, args.out, "charlm", "test_bpc", "test bits per character")
    return records


def _table(records, key, fmt):
    methods = [
        m for m in ("bptt", "dni", "dni-aux") if any(r["method"] == m for r in records)
    ]
    lines = [
        "| T | " + " | ".join(f"{m}: per seed | mean ± std" for m in methods) + " |",
        "|---|" + "---|---|" * len(methods),
    ]
    for t in sorted({r["truncation"] for r in records}):
        cells = []
        for method in methods:
            rows = sorted(
                (r for r in records if r["truncation"] == t and r["method"] == method),
                key=lambda r: r["seed"],
            )
            values = [r["metrics"][key] for r in rows]
            if values:
                cells.append(", ".join(fmt.format(v) for v in values))
                cells.append(
                    f"{fmt.format(np.mean(values))} ± {fmt.format(np.std(values))}"
                )
            else:
                cells += ["—", "—"]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def length_table(records):
    """Markdown table of the largest output length per T, method and seed."""
    return _table(records, "max_length", "{:g}")


def bpc_table(records):
    """Markdown table of the test BPC per T, method and seed."""
    return _table(records, "test_bpc", "{:.3f}")


def _plot(records, out, name, key, ylabel):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in dict.fromkeys(r["method"] for r in records):
        points = {}
        for r in records:
            if r["method"] == method:
                points.setdefault(r["truncation"], []).append(r["metrics"][key])
        ts = sorted(points)
        ax.errorbar(
            ts,
            [np.mean(points[t]) for t in ts],
            yerr=[np.std(points[t]) for t in ts],
            marker="o",
            label=method,
        )
    ax.set(xlabel="truncation T", ylabel=ylabel, title=name)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, f"{name}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
