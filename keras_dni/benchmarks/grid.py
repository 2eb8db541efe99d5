"""The robustness grid: backprop, DNI and cDNI on models nobody tuned for.

`python -m keras_dni.bench grid` trains every method on every cell of
`CELLS`: MLPs that vary the data set (digits, the MNIST subset, MNIST-1D,
binary addition), the depth (2 to 10 hidden layers), the width (64 to
1024), the activation (ReLU, tanh, sigmoid) and the batch size (32 to 256),
each for a budget at which backprop has converged (Adam 1e-3, the library's
default gradient models). Each run records its held-out score after every
epoch, so convergence can be checked in `results.json`.

The methods: `backprop`; `dni` and `cdni` with every hidden layer a
`DNIDense` (library defaults: the gradient models fitted by least squares);
`dni-gradient` and `cdni-gradient`, the same with `sg_solver="gradient"`
(the gradient models trained by `sg_optimizer=Adam(1e-3)`, the default
before least squares); `dni-raw`, plain DNI with `M` on the raw `h`
(`sg_input_normalization=None`; the default normalises it), and
`cdni-layernorm`, cDNI with `M` on layer-normalised `h`
(`sg_input_normalization="layer"`, the default before `"auto"`);
`dni-bottom`, plain DNI with one decoupling point
only, after the first hidden layer (where to decouple:
`apply_dni(model, layers=...)`); `backprop-he` and `cdni-he`, the
same networks with every hidden layer's kernel initialised by
`"he_normal"` instead of Keras' default `"glorot_uniform"`;
`cdni-he-ridge`, as `cdni-he` with the least-squares ridge
`sg_solver_ridge=1e-2` instead of the default 1e-3; `cdni-glorot`, cDNI
with every hidden kernel initialised by `"glorot_uniform"` (`DNIDense`'s
`"auto"` picks `"he_normal"` for ReLU layers); `dni-before-clip` and
`cdni-before-clip`, the defaults before 2026-11-28: `"glorot_uniform"`
kernels and no bound on the synthetic gradient
(`sg_prediction_clip=None`), which the older records used;
`dni-clip1` and `cdni-clip1`, the defaults with the tighter bound
`sg_prediction_clip=1.0` (what the docs advise with SGD);
`dni-calibrated` and `cdni-calibrated`, the defaults with
`sg_calibration=True`.

Cells marked `held_out` were never used to choose a default or a budget:
they are there to check that what holds on the others holds elsewhere.
"""

import concurrent.futures
import json
import multiprocessing
import os
import time

import numpy as np

GRID_METHODS = (
    "backprop",
    "dni",
    "cdni",
    "dni-gradient",
    "cdni-gradient",
    "dni-bottom",
    "dni-raw",
    "cdni-layernorm",
    "backprop-he",
    "cdni-he",
    "cdni-he-ridge",
    "cdni-glorot",
    "dni-before-clip",
    "cdni-before-clip",
    "dni-clip1",
    "cdni-clip1",
    "dni-calibrated",
    "cdni-calibrated",
)
_HE = {"kernel_initializer": "he_normal"}
_GLOROT = {"kernel_initializer": "glorot_uniform"}
_NO_CLIP = {"sg_prediction_clip": None}
_CLIP1 = {"sg_prediction_clip": 1.0}
_CALIBRATED = {"sg_calibration": True}
# Grid method -> (bench method, hidden layers that are DNI layers or None for
# all, extra DNIDense arguments, extra arguments of every hidden layer).
_METHOD_SETUP = {
    "backprop": ("backprop", None, {}, {}),
    "dni": ("dni", None, {}, {}),
    "cdni": ("cdni", None, {}, {}),
    "dni-gradient": ("dni", None, {"sg_solver": "gradient"}, {}),
    "cdni-gradient": ("cdni", None, {"sg_solver": "gradient"}, {}),
    "dni-bottom": ("dni", [0], {}, {}),
    "dni-raw": ("dni", None, {"sg_input_normalization": None}, {}),
    "cdni-layernorm": ("cdni", None, {"sg_input_normalization": "layer"}, {}),
    "backprop-he": ("backprop", None, {}, _HE),
    "cdni-he": ("cdni", None, {}, _HE),
    "cdni-he-ridge": ("cdni", None, {"sg_solver_ridge": 1e-2}, _HE),
    "cdni-glorot": ("cdni", None, {}, _GLOROT),
    "dni-before-clip": ("dni", None, _NO_CLIP, _GLOROT),
    "cdni-before-clip": ("cdni", None, _NO_CLIP, _GLOROT),
    "dni-clip1": ("dni", None, _CLIP1, {}),
    "cdni-clip1": ("cdni", None, _CLIP1, {}),
    "dni-calibrated": ("dni", None, _CALIBRATED, {}),
    "cdni-calibrated": ("cdni", None, _CALIBRATED, {}),
}


def _cell(task, depth, width, activation, batch_size, epochs, held_out=False):
    name = f"{task}-{depth}x{width}-{activation}-b{batch_size}"
    return {
        "name": name,
        "task": task,
        "depth": depth,
        "width": width,
        "activation": activation,
        "batch_size": batch_size,
        "epochs": epochs,
        "held_out": held_out,
    }


# Budgets: epochs after which backprop's held-out score no longer climbs
# (checked on the curves that `results.json` keeps).
CELLS = (
    _cell("digits", 3, 256, "relu", 64, 60),
    _cell("digits", 6, 128, "relu", 128, 60),
    _cell("digits", 10, 128, "relu", 128, 60),
    _cell("digits", 6, 256, "relu", 64, 60),
    _cell("digits", 4, 64, "tanh", 32, 40, held_out=True),
    _cell("digits", 3, 1024, "sigmoid", 256, 100, held_out=True),
    _cell("mnist5k", 3, 256, "relu", 64, 30),
    _cell("mnist5k", 6, 256, "relu", 128, 40),
    _cell("mnist5k", 10, 128, "relu", 128, 40),
    _cell("mnist5k", 4, 512, "tanh", 64, 20, held_out=True),
    _cell("mnist1d", 3, 256, "relu", 64, 60),
    _cell("mnist1d", 6, 128, "tanh", 128, 60, held_out=True),
    _cell("binary-addition", 2, 128, "relu", 64, 120),
)
_MAIN = {cell["name"]: cell for cell in CELLS}
# The depth sweep (`--cells depth`): issue 13's depth targets, digits and the
# MNIST subset at 6 and 10 ReLU layers of 128 and 256, batch 64 and 128, at
# the main grid's budgets. Cells of the main grid are reused as they are;
# the others were not used to choose any default (held out).
DEPTH_CELLS = tuple(
    _MAIN.get(
        f"{task}-{depth}x{width}-relu-b{batch}",
        _cell(task, depth, width, "relu", batch, epochs, held_out=True),
    )
    for task, epochs in (("digits", 60), ("mnist5k", 40))
    for depth in (6, 10)
    for width in (128, 256)
    for batch in (64, 128)
)
SMALL_CELLS = (
    _cell("digits", 3, 16, "relu", 64, 2),
    _cell("binary-addition", 2, 16, "sigmoid", 64, 2, held_out=True),
)


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected one of "
            f"{list(allowed)}. Received: {name}={value!r}"
        )


def run_cell(cell, method, seed, small=False):
    """Trains `method` on one grid cell; returns its results record.

    The record's `metrics` hold the final held-out score (`accuracy`, or
    `bit_accuracy` and `exact_accuracy` for binary addition), `curve` (the
    main score after every epoch) and `train_seconds`.
    """
    import keras

    from keras_dni.benchmarks.models import build_mlp
    from keras_dni.benchmarks.tasks import load_task
    from keras_dni.benchmarks.tasks import scores_each_epoch

    _check("method", method, GRID_METHODS)
    x, y, xt, yt, kind = load_task(cell["task"], small=small)
    keras.utils.set_random_seed(seed)
    if kind == "bits":
        out, act, loss, key = y.shape[1], "sigmoid", "binary_crossentropy", "exact"
    else:
        out, act, loss, key = 10, "softmax", "sparse_categorical_crossentropy", ""
    key = "exact_accuracy" if key else "accuracy"
    bench_method, dni_layers, dni_kwargs, layer_kwargs = _METHOD_SETUP[method]
    model = build_mlp(
        bench_method,
        x.shape[1],
        out,
        act,
        width=cell["width"],
        depth=cell["depth"],
        dni_layers=dni_layers,
        activation=cell["activation"],
        dni_kwargs=dni_kwargs,
        **layer_kwargs,
    )
    model.compile(keras.optimizers.Adam(1e-3), loss)
    scores = []
    start = time.time()
    model.fit(
        x,
        y,
        batch_size=cell["batch_size"],
        epochs=cell["epochs"],
        verbose=0,
        callbacks=[scores_each_epoch(xt, yt, kind, scores)],
    )
    metrics = dict(scores[-1])
    metrics["curve"] = [round(s[key], 4) for s in scores]
    metrics["train_seconds"] = time.time() - start
    return {
        "task": "grid",
        "cell": cell["name"],
        "method": method,
        "seed": seed,
        "metrics": metrics,
        "config": {**cell, **layer_kwargs},
    }


def _job(kwargs):
    """One grid run in a worker process, with one TensorFlow thread."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return run_cell(**kwargs)


def main_score(record):
    """The score a grid cell is judged on: accuracy, or exact sums."""
    m = record["metrics"]
    return m["accuracy"] if "accuracy" in m else m["exact_accuracy"]


def run_grid(cells, methods, seeds, jobs=1, small=False, log_path=None):
    """Every method and seed on every cell; returns the records.

    With `jobs` above 1, that many runs train at a time, each in its own
    process with one TensorFlow thread; otherwise one after the other in
    this process. Records are sorted by cell (in `cells` order), method
    and seed. With `log_path`, each record is also appended to that file
    (one JSON object per line) as soon as its run ends, so an interrupted
    grid keeps what it measured.
    """
    for method in methods:
        _check("method", method, GRID_METHODS)
    work = [
        {"cell": cell, "method": method, "seed": seed, "small": small}
        for cell in sorted(cells, key=lambda c: -c["depth"] * c["width"])
        for seed in range(seeds)
        for method in methods
    ]
    records = []

    def finish(record):
        records.append(record)
        if log_path:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        print(
            f"grid {record['cell']:34s} {record['method']:10s} seed "
            f"{record['seed']}: {100 * main_score(record):6.2f} % "
            f"({record['metrics']['train_seconds']:.0f} s)",
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
            finish(run_cell(**kwargs))
    order = {cell["name"]: i for i, cell in enumerate(cells)}
    records.sort(
        key=lambda r: (order[r["cell"]], GRID_METHODS.index(r["method"]), r["seed"])
    )
    return records


def _stats(records, cell, method):
    values = [
        100 * main_score(r)
        for r in records
        if (r["cell"], r["method"]) == (cell, method)
    ]
    if not values:
        return None
    return float(np.mean(values)), float(np.std(values)), values


def grid_table(records):
    """Markdown table: per cell and method, mean ± std over seeds (%).

    The score is held-out accuracy, or exact sums for binary addition;
    methods other than backprop also show their gap to backprop in points,
    and `collapsed` counts runs that ended below twice chance while
    backprop learned. Held-out cells are marked `*`.
    """
    grid = [r for r in records if r["task"] == "grid"]
    if not grid:
        return ""
    methods = [m for m in GRID_METHODS if any(r["method"] == m for r in grid)]
    cells = list(dict.fromkeys(r["cell"] for r in grid))
    held = {r["cell"] for r in grid if r["config"].get("held_out")}
    lines = [
        "| cell | " + " | ".join(methods) + " | collapsed |",
        "|---|" + "---|" * (len(methods) + 1),
    ]
    for cell in cells:
        base = _stats(grid, cell, "backprop")
        bits = any("exact_accuracy" in r["metrics"] for r in grid if r["cell"] == cell)
        row = [cell + (" *" if cell in held else "")]
        collapsed = 0
        for method in methods:
            stats = _stats(grid, cell, method)
            if stats is None:
                row.append("-")
                continue
            mean, std, values = stats
            text = f"{mean:.1f} ± {std:.1f}"
            if base is not None and method != "backprop":
                text += f" ({mean - base[0]:+.1f})"
                if not bits and base[0] > 40.0:
                    collapsed += sum(v < 20.0 for v in values)
            row.append(text)
        row.append(str(collapsed))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(
        "Held-out score (%), mean ± std over seeds; in brackets the gap to "
        "backprop in points; binary addition: sums exactly right. `*`: "
        "held-out cell. collapsed: runs below twice chance while backprop "
        "learned."
    )
    return "\n".join(lines)


def plot_grid(records, out_dir):
    """Heat map of each method's gap to backprop per cell; returns paths."""
    grid = [r for r in records if r["task"] == "grid"]
    methods = [m for m in GRID_METHODS[1:] if any(r["method"] == m for r in grid)]
    cells = list(dict.fromkeys(r["cell"] for r in grid))
    if not methods or not cells:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gaps = np.full((len(cells), len(methods)), np.nan)
    for i, cell in enumerate(cells):
        base = _stats(grid, cell, "backprop")
        for j, method in enumerate(methods):
            stats = _stats(grid, cell, method)
            if base is not None and stats is not None:
                gaps[i, j] = stats[0] - base[0]
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(methods), 0.9 + 0.42 * len(cells)))
    limit = max(1.0, float(np.nanmax(np.abs(gaps))) if np.isfinite(gaps).any() else 1.0)
    image = ax.imshow(gaps, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for i in range(len(cells)):
        for j in range(len(methods)):
            if np.isfinite(gaps[i, j]):
                ax.text(
                    j, i, f"{gaps[i, j]:+.1f}", ha="center", va="center", fontsize=8
                )
    held = {r["cell"] for r in grid if r["config"].get("held_out")}
    ax.set_xticks(range(len(methods)), methods)
    ax.set_yticks(range(len(cells)), [c + (" *" if c in held else "") for c in cells])
    ax.set_title("gap to backprop (points; * held out)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = os.path.join(out_dir, "grid.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def grid_runs(task, args, methods):
    """The CLI's runner of `grid` (`--small`: two tiny cells)."""
    del task
    cells = SMALL_CELLS if args.small else CELLS
    if args.cells == "depth":
        cells = DEPTH_CELLS
    elif args.cells:
        wanted = [c.strip() for c in args.cells.split(",") if c.strip()]
        known = {c["name"]: c for c in cells + (() if args.small else DEPTH_CELLS)}
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise ValueError(
                f"Received an invalid value for `--cells`, expected `depth` or "
                f"names among {list(known)}. Received: {unknown}"
            )
        cells = tuple(known[name] for name in dict.fromkeys(wanted))
    if args.epochs is not None:
        cells = tuple({**c, "epochs": args.epochs} for c in cells)
    start = time.time()
    records = run_grid(
        cells,
        methods,
        args.seeds,
        jobs=args.jobs,
        small=args.small,
        log_path=os.path.join(args.out, "runs.jsonl"),
    )
    print(f"\ngrid: {len(records)} runs in {time.time() - start:.0f} s", flush=True)
    return records
