"""`python -m keras_dni.bench`: the benchmark CLI, `keras_dni.benchmarks.cli`.

Kept so that the command works; the benchmark code lives in the subpackage
`keras_dni.benchmarks`. Its main names are re-exported here.
"""

import sys

from keras_dni.benchmarks.cli import TASKS
from keras_dni.benchmarks.cli import main
from keras_dni.benchmarks.cli import make_parser
from keras_dni.benchmarks.models import METHODS
from keras_dni.benchmarks.models import build_cnn
from keras_dni.benchmarks.models import build_mlp
from keras_dni.benchmarks.report import plot
from keras_dni.benchmarks.report import summarise
from keras_dni.benchmarks.runs import run_copy
from keras_dni.benchmarks.runs import run_mlp
from keras_dni.benchmarks.runs import run_timing
from keras_dni.benchmarks.runs import step_macs
from keras_dni.benchmarks.tasks import load_task

__all__ = [
    "METHODS",
    "TASKS",
    "build_cnn",
    "build_mlp",
    "load_task",
    "main",
    "make_parser",
    "plot",
    "run_copy",
    "run_mlp",
    "run_timing",
    "step_macs",
    "summarise",
]

if __name__ == "__main__":
    sys.exit(main())
