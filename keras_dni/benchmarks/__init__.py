"""Benchmarks of keras_dni: tasks, data, runs, reports and the CLI.

Not part of the library's API (that is the package root, `keras_dni`). The
command line is `python -m keras_dni.benchmarks` (also `python -m
keras_dni.bench` and the `keras-dni-bench` script); see `cli`.

- `data`: offline data sets (digits, the MNIST subset, MNIST-1D, binary
  addition).
- `copy_task`: the recurrent copy task and its curriculum.
- `models`: the benchmark networks (`build_mlp`, `build_cnn`).
- `tasks`: loading and scoring the MLP tasks.
- `runs`: training runs (MLP tasks, copy, timing) and the CLI's runner of
  each task.
- `report`: Markdown tables, plots, `results.json`.
- `cli`: the argument parser, the table of tasks and `main`.
"""
