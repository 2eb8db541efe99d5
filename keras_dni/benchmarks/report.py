"""Reports of benchmark records: Markdown tables, plots and `results.json`.

A record is a dict `{"task", "method", "seed", "metrics", "config"}` (copy
records also have `"truncation"`), as the runs of `runs` return them.
"""

import json
import os

import numpy as np

from keras_dni.benchmarks.grid import grid_table
from keras_dni.benchmarks.grid import plot_grid
from keras_dni.benchmarks.models import METHODS
from keras_dni.benchmarks.paper_fcn import paper_fcn_table
from keras_dni.benchmarks.recurrent_runs import bpc_table
from keras_dni.benchmarks.recurrent_runs import length_table
from keras_dni.benchmarks.schedules_bench import schedules_table
from keras_dni.benchmarks.tasks import MLP_TASKS
from keras_dni.benchmarks.throughput import throughput_table


def _group(record):
    """The table row / plot name of a record: its task, `-cnn` for CNNs,
    and the schedule and update probability where not the defaults."""
    config = record.get("config", {})
    name = record["task"] + ("-cnn" if config.get("arch") == "cnn" else "")
    schedule = config.get("schedule", "locked")
    probability = config.get("update_probability", 1.0)
    if schedule != "locked" or probability != 1.0:
        name += f"-{schedule}" + (f"-p{probability:g}" if probability != 1.0 else "")
    return name


def summarise(records):
    """Markdown tables: mean ± std over seeds per task, metric and method.

    Timing records get a table of step times per width, copy records the
    table of `copy_table`.
    """
    lines = []
    # Tasks with tables of their own (the recurrent ones print theirs).
    own_tables = ("timing", "copy", "grid", "schedules", "throughput")
    own_tables += ("repeat-copy", "charlm", "paper-fcn")
    acc_records = [r for r in records if r["task"] not in own_tables]
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
    grid = [r for r in records if r["task"] == "grid"]
    if grid:
        if lines:
            lines.append("")
        lines.append(grid_table(grid))
    schedules = [r for r in records if r["task"] == "schedules"]
    if schedules:
        if lines:
            lines.append("")
        lines.append(schedules_table(schedules))
    own = {
        "throughput": throughput_table,
        "paper-fcn": paper_fcn_table,
        "repeat-copy": length_table,
        "charlm": bpc_table,
    }
    for task, table in own.items():
        rows = [r for r in records if r["task"] == task]
        if rows:
            if lines:
                lines.append("")
            lines.append(table(rows))
    copy = [r for r in records if r["task"] == "copy"]
    if copy:
        lines.append("")
        lines.append(copy_table(copy))
    return "\n".join(lines)


_COPY_NAMES = {"bptt": "truncated BPTT", "dni": "DNI"}


def _first_length(record):
    """The first N of a copy record's curriculum (`-` if not recorded)."""
    config = record.get("config", {})
    return record["metrics"].get("start_length", config.get("start_length", "-"))


def copy_table(records):
    """Markdown table of copy-task records, one row per truncation T.

    Columns: T, the first N of the curriculum, then for each method its
    largest N solved per seed (in seed order) and their mean, and, with both
    methods, DNI / BPTT: the ratio of the means, `BPTT 0` where truncated
    BPTT never solved its first N but DNI did, `-` where neither did.
    """
    copy = [r for r in records if r["task"] == "copy"]
    methods = sorted(
        {r["method"] for r in copy},
        key=lambda m: (list(_COPY_NAMES).index(m) if m in _COPY_NAMES else 2, m),
    )
    ratio = set(_COPY_NAMES) <= set(methods)
    header = ["T", "first N"]
    for method in methods:
        header += [f"{_COPY_NAMES.get(method, method)}: N per seed", "mean"]
    if ratio:
        header.append("DNI / BPTT")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for t in sorted({r["truncation"] for r in copy}):
        rows = sorted(
            (r for r in copy if r["truncation"] == t), key=lambda r: r["seed"]
        )
        first = dict.fromkeys(str(_first_length(r)) for r in rows)
        row = [str(t), ", ".join(first)]
        means = {}
        for method in methods:
            values = [r["metrics"]["max_length"] for r in rows if r["method"] == method]
            if values:
                means[method] = float(np.mean(values))
                row += [", ".join(str(v) for v in values), f"{means[method]:.1f}"]
            else:
                row += ["-", "-"]
        if ratio:
            bptt, dni = means.get("bptt"), means.get("dni")
            if bptt is None or dni is None:
                row.append("-")
            elif bptt:
                row.append(f"{dni / bptt:.2f}x")
            else:  # truncated BPTT never solved its first N
                row.append("BPTT 0" if dni else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_results(records, path):
    """Writes `records` as JSON to `path` (`OUT/results.json`); returns it."""
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path


def plot(records, out_dir):
    """Writes learning-curve and timing PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = plot_grid(records, out_dir)
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
