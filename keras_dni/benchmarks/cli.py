"""`python -m keras_dni.bench`: backprop vs DNI vs cDNI, with tables and plots.

Also `python -m keras_dni.benchmarks` and the `keras-dni-bench` script.

Tasks:

- `digits`, `mnist5k`, `mnist1d`, `binary-addition`: the same MLP (3 hidden
  layers of 256, ReLU; Adam 1e-3, batch 64) trained with backprop
  (`keras.layers.Dense`), DNI and cDNI (`keras_dni.DNIDense` in a
  `DNISequential`); held-out accuracy after every epoch. With
  `--arch cnn`, `digits` and `mnist5k` train a small CNN instead (two 3x3
  convolutions of 32 and 64 filters, each followed by 2x2 max-pooling, then
  the softmax layer; `keras_dni.DNIConv2D` for DNI and cDNI).
- `copy`: the recurrent copy task (`copy_task`), truncated BPTT vs DNI, for
  each truncation length of `--truncations`; `--jobs N` trains N runs at a
  time, each in its own process with one TensorFlow thread.
- `grid`: the robustness grid (`grid.CELLS`): backprop, DNI, cDNI and DNI
  with one decoupling point after the first hidden layer (`dni-bottom`) on
  MLPs of other data sets, depths, widths, activations and batch sizes, at
  budgets where backprop has converged; a table of gaps to backprop and a
  heat map (`grid.png`). `--jobs N` as for `copy`; `--cells` picks cells
  (`--cells depth`: the depth sweep, 6 and 10 layers).
- `timing`: training-step time of DNI and cDNI relative to backprop for
  784-w-w-10 MLPs of growing width `w`, batch 128, measured alternately in one
  process (median of repeats).
- `schedules`: peak memory of a training step of a deep MLP (`--depth`
  layers of `--width`) with backprop, and DNI under `schedule="locked"` and
  `"unlocked"` split into `--stages` stages, per batch size of
  `--batch-sizes`; one fresh process per configuration (`schedules_bench`).
- `repeat-copy`: repeat copy (Graves et al. 2014) on the stream protocol
  (`streams`), truncated BPTT (`bptt`), DNI (`dni`) and DNI + Aux
  (`dni-aux`) per truncation of `--truncations`; `copy --protocol stream`
  runs the copy task on the same protocol.
- `charlm`: character-level language modelling on the pydoc topics text
  (`charlm`), bits per character on its test part, the same three methods.
- `throughput`: examples per second in `fit` of the same MLP under
  `schedule="pipelined"` (one thread per stage) against backprop (every
  core in each op) and `"locked"` DNI, per width of `--widths`, batch size
  and number of stages, measured alternately in fresh processes,
  `--seeds` rounds (`throughput`).
- MLP tasks with `--schedule unlocked|pipelined` and
  `--update-probability p`: the DNI models compiled with that schedule.
- `paper-fcn`: the paper's feed-forward protocol (`paper_fcn`): FCNs of
  `--depths` hidden layers of 256 with batch norm, every layer decoupled
  (DNI: gradient model 2x1024 with batch norm; cDNI: linear), Adam with
  step decay, batch 256, `--iterations` iterations, on the MNIST subset and
  a larger generated MNIST-1D (`--datasets`); a table by depth and a plot.

Several tasks, comma-separated, run one after the other into one
`results.json` and one table.

Writes `OUT/results.json` (a list of `{"task", "method", "seed", "metrics",
"config"}` records; also to `--json PATH` if given) and PNG plots, and prints
a Markdown table.

Examples:

    python -m keras_dni.bench digits --seeds 3 --epochs 30 --out results
    python -m keras_dni.bench digits,mnist5k,binary-addition --out results/depth
    python -m keras_dni.bench copy --steps 20000 --start-length auto --jobs 2

Adding a task: a module of this subpackage with a runner
`runner(task, args, methods)` returning the task's records, an entry in
`RUNNERS` and, if it needs them, its options in `make_parser`.
"""

import argparse
import os
import sys

from keras_dni.benchmarks import grid
from keras_dni.benchmarks import paper_fcn
from keras_dni.benchmarks import recurrent_runs
from keras_dni.benchmarks import runs
from keras_dni.benchmarks import schedules_bench
from keras_dni.benchmarks import throughput
from keras_dni.benchmarks.models import ARCHS
from keras_dni.benchmarks.models import METHODS
from keras_dni.benchmarks.report import plot
from keras_dni.benchmarks.report import summarise
from keras_dni.benchmarks.report import write_results
from keras_dni.benchmarks.runs import COPY_MAX_LENGTH
from keras_dni.benchmarks.tasks import IMAGE_TASKS
from keras_dni.benchmarks.tasks import MLP_TASKS

# The tasks of the CLI: name -> runner(task, args, methods), which runs the
# task for the parsed and checked arguments and returns its records.
RUNNERS = {
    **{task: runs.mlp_runs for task in MLP_TASKS},
    "copy": runs.copy_runs,
    "timing": runs.timing_runs,
    "grid": grid.grid_runs,
    "schedules": schedules_bench.schedules_runs,
    "throughput": throughput.throughput_runs,
    "paper-fcn": paper_fcn.paper_fcn_runs,
    "repeat-copy": recurrent_runs.stream_runs,
    "charlm": recurrent_runs.charlm_runs,
}
TASKS = tuple(RUNNERS)


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


def _names(tasks):
    return ", ".join(repr(t) for t in tasks)


def make_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_dni.bench",
        description="Benchmark backprop, DNI and cDNI on offline tasks.",
    )
    parser.add_argument(
        "task",
        help=f"one of: {', '.join(TASKS)}; or several, comma-separated (one "
        "results.json, one table)",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of {','.join(METHODS)} (default: all); "
        f"grid: of {','.join(grid.GRID_METHODS)}",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="copy, repeat-copy and charlm: the seeds are FIRST_SEED to "
        "FIRST_SEED + SEEDS - 1 (default 0), to add seeds to a table",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs (default 30; copy: training steps budget is --steps)",
    )
    parser.add_argument("--out", default="bench_results")
    parser.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the records (results.json) to PATH",
    )
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
        "--steps",
        type=int,
        default=None,
        help="copy: training steps per run (default 3000; --small: 20)",
    )
    parser.add_argument(
        "--start-length",
        type=_start_length_arg,
        default=1,
        help="copy: the first N of the curriculum (default 1), or 'auto': per "
        "T, the first N whose sequence spans more than one chunk, ceil(T/2)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="copy: runs trained at a time; above 1, each in its own process "
        "with one TensorFlow thread (default 1: one after the other, in this "
        "process)",
    )
    parser.add_argument("--units", type=int, default=128, help="copy: LSTM units")
    parser.add_argument(
        "--sg-solver",
        default="auto",
        choices=["auto", "least_squares", "gradient"],
        help="MLP, CNN, timing and schedules tasks: the DNI layers' `sg_solver` "
        "(default auto: "
        "least squares for the linear gradient models; 'gradient': "
        "sg_optimizer=Adam(1e-3), the default before least squares)",
    )
    parser.add_argument(
        "--sg-prediction-clip",
        type=runs.prediction_clip_value,
        default="default",
        help="the DNI layers' `sg_prediction_clip`, a float or 'none' "
        "(default: the library's: 3.0 for the MLP and CNN tasks, 1.0 for "
        "DNIRNN in copy, repeat-copy and charlm; 'none': the default "
        "before 2026-11-28)",
    )
    parser.add_argument(
        "--sg-calibration",
        action="store_true",
        help="MLP and CNN tasks: the DNI layers' `sg_calibration=True` "
        "(the synthetic gradient scaled by how well M has predicted)",
    )
    parser.add_argument(
        "--kernel-initializer",
        default=None,
        help="MLP tasks: the hidden layers' `kernel_initializer` (default: "
        "each layer's own; `DNIDense` picks 'he_normal' for ReLU since "
        "2026-11-28, 'glorot_uniform' reproduces the runs before)",
    )
    parser.add_argument(
        "--schedule",
        default="locked",
        choices=["locked", "unlocked", "pipelined"],
        help="MLP and CNN tasks: the DNI models' `compile(schedule=...)` "
        "(default locked)",
    )
    parser.add_argument(
        "--update-probability",
        type=float,
        default=1.0,
        help="MLP and CNN tasks: the DNI models' `compile(update_probability=...)`, "
        "in (0, 1] (default 1)",
    )
    parser.add_argument(
        "--cells",
        default=None,
        help="grid: comma-separated cell names (default: every cell), or "
        "`depth` for the depth sweep (`grid.DEPTH_CELLS`)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="copy: sequences per step"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=3e-3,
        help="copy: Adam learning rate of the network (default 3e-3)",
    )
    parser.add_argument(
        "--sg-learning-rate",
        type=float,
        default=1e-3,
        help="copy: Adam learning rate of the gradient model M (default 1e-3)",
    )
    parser.add_argument(
        "--sg-input-normalization",
        default=None,
        choices=["auto", "layer", "none"],
        help="the gradient models' input normalisation (default: the layers' "
        "default, `auto` for the MLP and CNN tasks, none for the recurrent "
        "tasks)",
    )
    parser.add_argument(
        "--batch-sizes",
        default="128,512",
        help="schedules: comma-separated batch sizes (default 128,512)",
    )
    parser.add_argument(
        "--stages",
        default="2,4,8",
        help="schedules: comma-separated numbers of DNI stages, divisors of "
        "--depth (default 2,4,8); --steps: measured training steps (default 5)",
    )
    parser.add_argument(
        "--depth", type=int, default=8, help="schedules: hidden layers (default 8)"
    )
    parser.add_argument(
        "--width", type=int, default=1024, help="schedules: hidden width (default 1024)"
    )
    parser.add_argument(
        "--protocol",
        default="episodes",
        choices=["episodes", "stream"],
        help="copy: independent episodes (default) or one continuous stream "
        "of episodes per row with a stateful DNIRNN (repeat-copy always streams)",
    )
    parser.add_argument(
        "--chunks",
        type=int,
        default=None,
        help="stream tasks: chunks of T steps per training step (default: 1 for "
        "copy and repeat-copy; charlm: ceil(20 / T))",
    )
    parser.add_argument(
        "--stream-discount",
        type=float,
        default=0.5,
        help="stream tasks: DNIRNN's stream_discount (default 0.5)",
    )
    parser.add_argument(
        "--sg-states",
        default="auto",
        choices=["auto", "all", "outputs"],
        help="stream tasks: DNIRNN's sg_states, the states that get M's "
        "prediction (default auto: a stateful LSTM's h only)",
    )
    parser.add_argument(
        "--aux-weight",
        type=float,
        default=1.0,
        help="dni-aux: DNIRNN's aux_weight (default 1)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="charlm: training steps between validation BPC measurements (default 250)",
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=4,
        help="charlm: validation measurements without improvement before "
        "stopping early (default 4)",
    )
    parser.add_argument(
        "--depths",
        default="3,4,5,6",
        help="paper-fcn: comma-separated numbers of hidden layers (default 3,4,5,6)",
    )
    parser.add_argument(
        "--datasets",
        default="mnist5k,mnist1d",
        help="paper-fcn: comma-separated data sets (default mnist5k,mnist1d)",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help=f"paper-fcn: training iterations per run (default "
        f"{paper_fcn.ITERATIONS}; --small: {paper_fcn.SMALL_ITERATIONS})",
    )
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    tasks = list(dict.fromkeys(t.strip() for t in args.task.split(",") if t.strip()))
    unknown = [t for t in tasks if t not in TASKS] or ([] if tasks else [args.task])
    if unknown:
        parser.error(
            f"unknown task {_names(unknown)}: expected one of {', '.join(TASKS)}"
        )
    try:
        allowed = grid.GRID_METHODS if tasks == ["grid"] else METHODS
        default = allowed
        if all(t in recurrent_runs.RECURRENT_TASKS for t in tasks):
            # bptt (or backprop), dni, dni-aux; copy's default stays bptt, dni.
            allowed = recurrent_runs.METHOD_NAMES
            default = ("bptt", "dni") if tasks == ["copy"] else allowed[:3]
        methods = _parse_list(args.methods or ",".join(default), allowed, "method")
        if args.arch not in ARCHS:
            raise argparse.ArgumentTypeError(
                f"invalid --arch {args.arch!r}: expected one of {', '.join(ARCHS)}"
            )
        not_image = [t for t in tasks if t not in IMAGE_TASKS]
        if args.arch == "cnn" and not_image:
            raise argparse.ArgumentTypeError(
                f"--arch cnn applies to the tasks {', '.join(IMAGE_TASKS)}, "
                f"not to {_names(not_image)}"
            )
        if args.arch == "cnn" and args.dni_layers is not None:
            raise argparse.ArgumentTypeError("--dni-layers applies to --arch mlp")
        dni_layers = None
        if args.dni_layers is not None:
            not_mlp = [t for t in tasks if t not in MLP_TASKS]
            if not_mlp:
                raise argparse.ArgumentTypeError(
                    f"--dni-layers applies to the MLP tasks "
                    f"({', '.join(MLP_TASKS)}), not to {_names(not_mlp)}"
                )
            dni_layers = _parse_list(args.dni_layers, ("0", "1", "2"), "--dni-layers")
            dni_layers = sorted({int(i) for i in dni_layers})
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    for name in ("chunks", "eval_every"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be a positive integer, got {value}")
    if args.patience <= 0:
        parser.error(f"--patience must be a positive integer, got {args.patience}")
    if not 0.0 <= args.stream_discount <= 1.0:
        parser.error(f"--stream-discount must be in [0, 1], got {args.stream_discount}")
    if not args.aux_weight >= 0.0:
        parser.error(f"--aux-weight must be non-negative, got {args.aux_weight}")
    if args.first_seed < 0:
        parser.error(f"--first-seed must be non-negative, got {args.first_seed}")
    for name in ("seeds", "jobs", "units", "batch_size"):
        value = getattr(args, name)
        if value <= 0:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be a positive integer, got {value}")
    clip = args.sg_prediction_clip
    if clip not in ("default", None) and not 0.0 < clip < float("inf"):
        parser.error(f"--sg-prediction-clip must be positive or 'none', got {clip}")
    if not 0.0 < args.update_probability <= 1.0:
        parser.error(
            f"--update-probability must be in (0, 1], got {args.update_probability}"
        )
    if args.epochs is not None and args.epochs <= 0:
        parser.error(f"--epochs must be a positive integer, got {args.epochs}")
    if args.start_length != "auto" and not 1 <= args.start_length <= COPY_MAX_LENGTH:
        parser.error(
            f"--start-length must be 'auto' or an integer in [1, "
            f"{COPY_MAX_LENGTH}] (the copy curriculum's largest N), got "
            f"{args.start_length}"
        )
    args.dni_layers = dni_layers  # the runners get the checked indices
    os.makedirs(args.out, exist_ok=True)
    records = []
    for task in tasks:
        records.extend(RUNNERS[task](task, args, methods))
    paths = [write_results(records, os.path.join(args.out, "results.json"))]
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        paths.append(write_results(records, args.json))
    plots = plot(records, args.out)
    print()
    print(summarise(records))
    print(f"\nwrote {', '.join(paths)} and {', '.join(plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
