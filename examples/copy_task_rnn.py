"""Recurrent DNI (`keras_dni.DNIRNN`) vs truncated BPTT on the copy task.

An LSTM reads `N` random 8-bit vectors and a delimiter, then must write the
`N` vectors back (Graves et al. 2014; Jaderberg et al. 2017, section 3.2).
A sequence for `N` has `2N + 1` time steps. Both networks are trained with
truncated backprop through time in chunks of `T` steps
(`keras_dni.DNIRNN(cell, truncation=T)`); with `synthetic_gradient=True`
(DNI) the state at each chunk border also gets a synthetic gradient
`M(state)` that stands in for the gradient from the chunks after it, which
truncated BPTT drops. A curriculum raises `N` each time the error falls
below 0.15 bits per output step; the script prints the longest `N` (and
sequence length) each method solves within the same number of steps.

It uses `keras_dni.benchmarks.copy_task.run_copy_task` (an LSTM of 128
units, batch 32, Adam 3e-3 for the network and 1e-3 for `M`). A recurrent
`M` is always trained by gradient steps (`DNIRNN` does not use the
least-squares solver that fits the linear `M` of `DNIDense` and
`DNIConv2D` by default), so that default does not apply here. By default
the curriculum starts at the longest `N` whose sequence fits in one chunk
(`N = 2` at `T = 5`): both methods learn it with full backprop, and only
the longer ones need memory across a chunk border.

    python examples/copy_task_rnn.py [--truncation 5] [--steps 6000] [--seed 0]

takes under a minute on 2 CPU cores. With the defaults (`T = 5`, seed 0,
6,000 steps) truncated BPTT solves N = 2 (step 500) and no longer N; DNI
solves N = 3 at step 3,250 and N = 4 at step 4,700. `--smoke` runs it in
seconds.
"""

import argparse

import keras

from keras_dni.benchmarks import copy_task


def describe(result):
    length = result["max_length"]
    if length == 0:
        return "solved no N"
    solved = ", ".join(f"N={n} at step {step:,}" for step, n in result["history"])
    return f"longest N = {length} ({2 * length + 1} time steps); solved {solved}"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--truncation", type=int, default=5, help="T, steps per chunk")
    parser.add_argument(
        "--steps", type=int, default=6000, help="training steps per method"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--start-length",
        type=int,
        default=None,
        help="first N of the curriculum (default: the longest N whose "
        "sequence fits in one chunk)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny budget, runs in seconds (for tests)"
    )
    args = parser.parse_args(argv)
    # The first N whose sequence (2N + 1 steps) spans more than one chunk.
    first_truncated = copy_task.first_truncated_length(args.truncation)
    start_length = args.start_length or max(1, first_truncated - 1)
    budget = dict(units=128, window=50)
    if args.smoke:
        args.steps, budget = 20, dict(units=16, window=10)

    keras.utils.set_random_seed(args.seed)
    print(
        f"Copy task, truncation T = {args.truncation}, {args.steps:,} steps, "
        f"seed {args.seed}, curriculum from N = {start_length} (N >= "
        f"{first_truncated} spans more than one chunk)"
    )
    results = {}
    for name, synthetic_gradient in (("truncated BPTT", False), ("DNI", True)):
        result = copy_task.run_copy_task(
            args.truncation,
            synthetic_gradient,
            args.steps,
            args.seed,
            start_length=start_length,
            **budget,
        )
        results[name] = result
        print(f"{name:15s} {describe(result)} [{result['seconds']:.0f} s]", flush=True)

    print("\n| method | longest N solved | its sequence length (steps) |")
    print("|---|---|---|")
    for name, result in results.items():
        length = result["max_length"]
        steps = 2 * length + 1 if length else "-"
        print(f"| {name} | {length} | {steps} |")


if __name__ == "__main__":
    main()
