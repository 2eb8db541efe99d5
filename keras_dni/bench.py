"""`python -m keras_dni.bench`: backprop vs DNI vs cDNI, with tables and plots.

Tasks:

- `digits`, `mnist5k`, `mnist1d`, `binary-addition`: the same MLP (3 hidden
  layers of 256, ReLU; Adam 1e-3, batch 64) trained with backprop
  (`keras.layers.Dense`), DNI and cDNI (`keras_dni.DNIDense` in a
  `DNISequential`); held-out accuracy after every epoch. With
  `--arch cnn`, `digits` and `mnist5k` train a small CNN instead (two 3x3
  convolutions of 32 and 64 filters, each followed by 2x2 max-pooling, then
  the softmax layer; `keras_dni.DNIConv2D` for DNI and cDNI).
- `copy`: the recurrent copy task (truncated BPTT vs DNI), if
  `keras_dni.copy_task` is available.
- `timing`: training-step time of DNI and cDNI relative to backprop for
  784-w-w-10 MLPs of growing width `w`, batch 128, measured alternately in one
  process (median of repeats).

Writes `OUT/results.json` (a list of `{"task", "method", "seed", "metrics",
"config"}` records) and PNG plots, and prints a Markdown table.

Example:

    python -m keras_dni.bench digits --seeds 3 --epochs 30 --out results
"""

import argparse
import json
import os
import sys
import time

import numpy as np

METHODS = ("backprop", "dni", "cdni")
MLP_TASKS = ("digits", "mnist5k", "mnist1d", "binary-addition")
IMAGE_TASKS = ("digits", "mnist5k")
ARCHS = ("mlp", "cnn")
TASKS = MLP_TASKS + ("copy", "timing")
COPY_MAX_LENGTH = 64  # copy: the curriculum stops at this N


# ---------------------------------------------------------------- models
def _check_method(method):
    if method not in METHODS:
        raise ValueError(
            f"Received an invalid value for `method`, expected one of "
            f"{list(METHODS)}. Received: method={method!r}"
        )


def build_mlp(
    method,
    input_dim,
    output_dim,
    output_activation,
    width=256,
    depth=3,
    dni_layers=None,
):
    """The benchmark MLP for one method (`backprop`, `dni` or `cdni`).

    `dni_layers`: indices of the hidden layers (0 = bottom) that are
    `DNIDense` for `dni`/`cdni`; the others are plain `Dense`. `None`
    (default) makes every hidden layer a DNI layer.
    """
    import keras

    import keras_dni

    _check_method(method)
    if dni_layers is None:
        dni_layers = range(depth)
    bad = [i for i in dni_layers if not 0 <= i < depth]
    if bad:
        raise ValueError(
            f"Received an invalid value for `dni_layers`, expected indices of "
            f"hidden layers in [0, {depth - 1}]. Received: dni_layers="
            f"{list(dni_layers)!r}"
        )
    hidden = []
    for i in range(depth):
        if method == "backprop" or i not in dni_layers:
            hidden.append(
                keras.layers.Dense(width, activation="relu", name=f"hidden_{i}")
            )
        else:
            hidden.append(
                keras_dni.DNIDense(
                    width,
                    activation="relu",
                    conditional=method == "cdni",
                    name=f"hidden_{i}",
                )
            )
    layers = [keras.Input((input_dim,))] + hidden
    layers.append(
        keras.layers.Dense(output_dim, activation=output_activation, name="output")
    )
    if method == "backprop":
        return keras.Sequential(layers)
    return keras_dni.DNISequential(layers)


def build_cnn(method, image_size, output_dim):
    """The benchmark CNN for one method, on `image_size` square images."""
    import keras

    import keras_dni

    _check_method(method)
    if method == "backprop":
        conv, kwargs, cls = keras.layers.Conv2D, {}, keras.Sequential
    else:
        conv, cls = keras_dni.DNIConv2D, keras_dni.DNISequential
        kwargs = {"conditional": method == "cdni"}
    return cls(
        [
            keras.Input((image_size, image_size, 1)),
            conv(32, 3, padding="same", activation="relu", name="conv_0", **kwargs),
            keras.layers.MaxPooling2D(),
            conv(64, 3, padding="same", activation="relu", name="conv_1", **kwargs),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(output_dim, activation="softmax", name="output"),
        ]
    )


def load_task(task, small=False):
    """Returns `(x, y, x_test, y_test, kind)` for an MLP task."""
    from keras_dni import data

    if task == "binary-addition":
        n, n_test = (1000, 200) if small else (10000, 2000)
        (x, y), (xt, yt) = data.binary_addition(12, n, n_test, seed=0)
        kind = "bits"
    else:
        loader = {
            "digits": data.digits,
            "mnist5k": data.mnist5k,
            "mnist1d": data.mnist1d,
        }[task]
        (x, y), (xt, yt) = loader()
        kind = "classes"
    if small:
        x, y, xt, yt = x[:512], y[:512], xt[:256], yt[:256]
    return x, y, xt, yt, kind


def _score(pred, y, kind):
    if kind == "bits":
        right = (pred > 0.5) == (y > 0.5)
        return {
            "bit_accuracy": float(right.mean()),
            "exact_accuracy": float(right.all(axis=1).mean()),
        }
    return {"accuracy": float((pred.argmax(axis=1) == y).mean())}


def run_mlp(
    task,
    method,
    seed,
    epochs,
    small=False,
    batch_size=64,
    dni_layers=None,
    arch="mlp",
):
    """Trains one model; returns a results record.

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
    if arch == "cnn":
        model = build_cnn(method, x.shape[1], out)
    else:
        model = build_mlp(method, x.shape[1], out, act, dni_layers=dni_layers)
    model.compile(keras.optimizers.Adam(1e-3), loss)
    curve = []

    class Evaluate(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            pred = self.model.predict(xt, batch_size=1024, verbose=0)
            curve.append(_score(pred, yt, kind))

    start = time.time()
    model.fit(
        x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[Evaluate()]
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
):
    """Median training-step time per method and width, measured in turns.

    Each method's model trains `repeats` times for `steps` steps in the
    stock compiled `fit`, the methods taking turns so that drifts of the
    machine hit all of them. A step's time is measured between Keras'
    batch callbacks (the compiled train function and Keras' per-step
    work), which leaves out what `fit` does once per call; the figure is the
    median over all steps.
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
            model = build_mlp(method, 784, 10, "softmax", width=width, depth=2)
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
                    },
                }
            )
            print(
                f"width {width:5d} {method:8s} {1000 * median:8.2f} ms/step"
                f"  x{median / base:.2f} (multiply-adds x{macs / base_macs:.2f})",
                flush=True,
            )
    return records


# ---------------------------------------------------------------- output
def _group(record):
    """The table row / plot name of a record: its task, `-cnn` for CNNs."""
    if record.get("config", {}).get("arch") == "cnn":
        return record["task"] + "-cnn"
    return record["task"]


def summarise(records):
    """Markdown table: mean ± std over seeds per task, metric and method."""
    lines = []
    acc_records = [r for r in records if r["task"] not in ("timing", "copy")]
    if acc_records:
        methods = [m for m in METHODS if any(r["method"] == m for r in acc_records)]
        lines.append("| task | metric | " + " | ".join(methods) + " |")
        lines.append("|---|---|" + "---|" * len(methods))
        for task in dict.fromkeys(_group(r) for r in acc_records):
            rows = [r for r in acc_records if _group(r) == task]
            keys = [k for k in rows[0]["metrics"] if k.endswith("accuracy")]
            for key in keys:
                cells = []
                for method in methods:
                    vals = [
                        100 * r["metrics"][key] for r in rows if r["method"] == method
                    ]
                    cells.append(
                        f"{np.mean(vals):.1f} ± {np.std(vals):.1f} (n={len(vals)})"
                        if vals
                        else "—"
                    )
                lines.append(f"| {task} | {key} (%) | " + " | ".join(cells) + " |")
    timing = [r for r in records if r["task"] == "timing"]
    if timing:
        methods = list(dict.fromkeys(r["method"] for r in timing))
        lines.append("")
        lines.append(
            "| width | " + " | ".join(f"{m} ms/step (ratio)" for m in methods) + " |"
        )
        lines.append("|---|" + "---|" * len(methods))
        for width in dict.fromkeys(r["config"]["width"] for r in timing):
            cells = []
            for method in methods:
                (r,) = [
                    r
                    for r in timing
                    if r["method"] == method and r["config"]["width"] == width
                ]
                metrics = r["metrics"]
                ratio = [v for k, v in metrics.items() if k.startswith("ratio")][0]
                cell = f"{1000 * metrics['step_seconds']:.2f} (x{ratio:.2f}"
                macs = [v for k, v in metrics.items() if k.startswith("macs_ratio")]
                if macs:
                    cell += f"; arithmetic x{macs[0]:.2f}"
                cells.append(cell + ")")
            lines.append(f"| {width} | " + " | ".join(cells) + " |")
    copy = [r for r in records if r["task"] == "copy"]
    if copy:
        lines.append("")
        lines.append("| truncation T | method | max N per seed | mean | x BPTT |")
        lines.append("|---|---|---|---|---|")
        for t in sorted({r["truncation"] for r in copy}):
            base = None
            for method in dict.fromkeys(r["method"] for r in copy):
                vals = [
                    r["metrics"]["max_length"]
                    for r in copy
                    if r["truncation"] == t and r["method"] == method
                ]
                if not vals:
                    continue
                mean = float(np.mean(vals))
                if method == "bptt":
                    base = mean
                ratio = f"x{mean / base:.2f}" if base else "-"
                lines.append(f"| {t} | {method} | {vals} | {mean:.1f} | {ratio} |")
    return "\n".join(lines)


def plot(records, out_dir):
    """Writes learning-curve and timing PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task in dict.fromkeys(_group(r) for r in records):
        rows = [r for r in records if _group(r) == task]
        if rows[0]["task"] in MLP_TASKS:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for method in dict.fromkeys(r["method"] for r in rows):
                curves = (
                    np.array(
                        [r["metrics"]["curve"] for r in rows if r["method"] == method]
                    )
                    * 100
                )
                epochs = np.arange(1, curves.shape[1] + 1)
                mean, std = curves.mean(0), curves.std(0)
                ax.plot(epochs, mean, label=method)
                ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
            ylabel = (
                "exact sums (%)" if task == "binary-addition" else "test accuracy (%)"
            )
            ax.set(xlabel="epoch", ylabel=ylabel, title=task)
            ax.legend()
        elif task == "timing":
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for method in dict.fromkeys(r["method"] for r in rows):
                pts = sorted(
                    (
                        r["config"]["width"],
                        [v for k, v in r["metrics"].items() if k.startswith("ratio")][
                            0
                        ],
                    )
                    for r in rows
                    if r["method"] == method
                )
                ax.plot(*zip(*pts), marker="o", label=method)
            arithmetic = sorted(
                (r["config"]["width"], r["metrics"]["macs_ratio_to_backprop"])
                for r in rows
                if r["method"] == "dni" and "macs_ratio_to_backprop" in r["metrics"]
            )
            if arithmetic:
                ax.plot(
                    *zip(*arithmetic),
                    linestyle="--",
                    color="gray",
                    label="dni multiply-adds",
                )
            ax.set(
                xscale="log",
                xlabel="hidden width",
                ylabel="step time / backprop",
                title="training-step cost",
            )
            ax.legend()
        elif task == "copy":
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for method in dict.fromkeys(r["method"] for r in rows):
                pts = {}
                for r in rows:
                    if r["method"] == method:
                        pts.setdefault(r["truncation"], []).append(
                            r["metrics"]["max_length"]
                        )
                ts = sorted(pts)
                ax.errorbar(
                    ts,
                    [np.mean(pts[t]) for t in ts],
                    yerr=[np.std(pts[t]) for t in ts],
                    marker="o",
                    label=method,
                )
            ax.set(
                xlabel="truncation T", ylabel="max sequence length N", title="copy task"
            )
            ax.legend()
        else:
            continue
        fig.tight_layout()
        path = os.path.join(out_dir, f"{task}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- CLI
def _parse_list(value, allowed, name):
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"invalid {name} {bad or value!r}: expected a comma-separated "
            f"list of {', '.join(allowed)}"
        )
    return items


def _start_length_arg(value):
    """`--start-length`: `'auto'` or an int (range-checked in `main`)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or an integer, got {value!r}"
        ) from None


def make_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_dni.bench",
        description="Benchmark backprop, DNI and cDNI on offline tasks.",
    )
    parser.add_argument("task", help=f"one of: {', '.join(TASKS)}")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (default: all)",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs (default 30; copy: training steps budget is --steps)",
    )
    parser.add_argument("--out", default="bench_results")
    parser.add_argument(
        "--small", action="store_true", help="tiny data and budgets (smoke test)"
    )
    parser.add_argument(
        "--widths", default="256,1024,4096", help="timing: hidden widths"
    )
    parser.add_argument(
        "--jit-compile",
        action="store_true",
        help="timing: compile with XLA (default: Keras' 'auto', no XLA on CPU)",
    )
    parser.add_argument(
        "--arch",
        default="mlp",
        help=f"digits, mnist5k: the network, one of {', '.join(ARCHS)} (default mlp)",
    )
    parser.add_argument(
        "--dni-layers",
        default=None,
        help="MLP tasks: comma-separated indices of the hidden layers that are "
        "DNI layers for dni/cdni, 0 = bottom (default: all three)",
    )
    parser.add_argument(
        "--truncations", default="2,3,5,8", help="copy: truncation lengths"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="copy: training steps per run"
    )
    parser.add_argument(
        "--start-length",
        type=_start_length_arg,
        default=1,
        help="copy: the first N of the curriculum (default 1), or 'auto': per "
        "T, the first N whose sequence spans more than one chunk, ceil(T/2)",
    )
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.task not in TASKS:
        parser.error(f"unknown task {args.task!r}: expected one of {', '.join(TASKS)}")
    try:
        methods = _parse_list(args.methods, METHODS, "method")
        if args.task == "copy":
            methods = [m for m in methods if m != "cdni"]
        if args.arch not in ARCHS:
            raise argparse.ArgumentTypeError(
                f"invalid --arch {args.arch!r}: expected one of {', '.join(ARCHS)}"
            )
        if args.arch == "cnn" and args.task not in IMAGE_TASKS:
            raise argparse.ArgumentTypeError(
                f"--arch cnn applies to the tasks {', '.join(IMAGE_TASKS)}, "
                f"not to {args.task!r}"
            )
        if args.arch == "cnn" and args.dni_layers is not None:
            raise argparse.ArgumentTypeError("--dni-layers applies to --arch mlp")
        dni_layers = None
        if args.dni_layers is not None:
            if args.task not in MLP_TASKS:
                raise argparse.ArgumentTypeError(
                    f"--dni-layers applies to the MLP tasks "
                    f"({', '.join(MLP_TASKS)}), not to {args.task!r}"
                )
            dni_layers = _parse_list(args.dni_layers, ("0", "1", "2"), "--dni-layers")
            dni_layers = sorted({int(i) for i in dni_layers})
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if args.seeds <= 0:
        parser.error(f"--seeds must be a positive integer, got {args.seeds}")
    if args.epochs is not None and args.epochs <= 0:
        parser.error(f"--epochs must be a positive integer, got {args.epochs}")
    if args.start_length != "auto" and not 1 <= args.start_length <= COPY_MAX_LENGTH:
        parser.error(
            f"--start-length must be 'auto' or an integer in [1, "
            f"{COPY_MAX_LENGTH}] (the copy curriculum's largest N), got "
            f"{args.start_length}"
        )
    os.makedirs(args.out, exist_ok=True)
    records = []
    if args.task in MLP_TASKS:
        epochs = args.epochs or (2 if args.small else 30)
        for method in methods:
            for seed in range(args.seeds):
                record = run_mlp(
                    args.task,
                    method,
                    seed,
                    epochs,
                    small=args.small,
                    dni_layers=dni_layers,
                    arch=args.arch,
                )
                records.append(record)
                m = record["metrics"]
                acc = m.get("accuracy", m.get("exact_accuracy"))
                print(
                    f"{args.task} {method:8s} seed {seed}: "
                    f"test accuracy {100 * acc:.2f} % "
                    f"({m['train_seconds']:.0f} s)",
                    flush=True,
                )
    elif args.task == "timing":
        widths = [int(w) for w in args.widths.split(",")]
        if args.small:
            widths = widths[:1]
        records = run_timing(
            widths,
            methods,
            repeats=2 if args.small else 10,
            steps=5 if args.small else 30,
            jit_compile=True if args.jit_compile else "auto",
        )
    else:
        records = run_copy(args, methods)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
    plots = plot(records, args.out)
    print()
    print(summarise(records))
    print(f"\nwrote {os.path.join(args.out, 'results.json')} and {', '.join(plots)}")
    return 0


def run_copy(args, methods):
    try:
        from keras_dni import copy_task
    except ImportError:
        print("the copy task is not available in this version", file=sys.stderr)
        raise SystemExit(2)
    truncations = [int(t) for t in args.truncations.split(",")]
    steps = args.steps or (20 if args.small else 3000)
    records = []
    for t in truncations:
        for method in methods:
            for seed in range(args.seeds):
                result = copy_task.run_copy_task(
                    truncation=t,
                    synthetic_gradient=method != "backprop",
                    steps=steps,
                    seed=seed,
                    start_length=args.start_length,
                    max_length=COPY_MAX_LENGTH,
                )
                records.append(
                    {
                        "task": "copy",
                        "method": "dni" if method != "backprop" else "bptt",
                        "seed": seed,
                        "truncation": t,
                        "metrics": result,
                        "config": {
                            "steps": steps,
                            "start_length": result["start_length"],
                        },
                    }
                )
                print(
                    f"copy T={t} {records[-1]['method']:5s} seed {seed}: "
                    f"max N {result['max_length']}",
                    flush=True,
                )
    return records


if __name__ == "__main__":
    sys.exit(main())
