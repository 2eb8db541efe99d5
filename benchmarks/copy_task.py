"""Recurrent DNI vs truncated BPTT on the copy task (Jaderberg et al., 3.2).

For each truncation length T, trains the same LSTM on the copy task with
truncated BPTT and with DNI (`keras_dni.DNIRNN`, a synthetic gradient at each
truncation point), with the same budget of training steps and the same seeds,
under the curriculum of `keras_dni.copy_task.run_copy_task` (N grows by one
when the error falls below 0.15 bits per output step). Prints a Markdown
table of the largest N solved.

    python benchmarks/copy_task.py --steps 20000 --start-length auto

Runs `--jobs` trainings at a time, each in its own process with one
TensorFlow thread.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import time

MAX_LENGTH = 64  # the curriculum stops at this N


def _run(kwargs):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from keras_dni.copy_task import run_copy_task

    result = run_copy_task(**kwargs)
    return kwargs, result


def _start_length(value):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or an integer, got {value!r}"
        ) from None


def _table(records, truncations, seeds):
    by_key = {
        (r["truncation"], r["synthetic_gradient"], r["seed"]): r["max_length"]
        for r in records
    }
    first = {r["truncation"]: r["start_length"] for r in records}
    lines = [
        "| T | first N | truncated BPTT: N per seed | mean | DNI: N per seed "
        "| mean | DNI / BPTT |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in truncations:
        row = [str(t), str(first[t])]
        means = []
        for sg in (False, True):
            values = [by_key[(t, sg, s)] for s in seeds]
            means.append(sum(values) / len(values))
            row += [", ".join(str(v) for v in values), f"{means[-1]:.1f}"]
        if means[0]:
            row.append(f"{means[1] / means[0]:.2f}x")
        else:  # truncated BPTT never solved the first N
            row.append("BPTT 0" if means[1] else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--truncations", default="2,3,5,8")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument(
        "--start-length",
        type=_start_length,
        default=1,
        help="the first N of the curriculum, or 'auto': per T, the first N "
        "whose sequence spans more than one chunk, ceil(T/2)",
    )
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--sg-learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--sg-input-normalization", default="none", choices=["layer", "none"]
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args()
    if args.start_length != "auto" and not 1 <= args.start_length <= MAX_LENGTH:
        parser.error(
            f"--start-length must be 'auto' or an integer in [1, {MAX_LENGTH}], "
            f"got {args.start_length}"
        )
    truncations = sorted({int(t) for t in args.truncations.split(",")})
    seeds = list(range(args.seeds))
    norm = None if args.sg_input_normalization == "none" else "layer"
    jobs = []
    # Longest sequences (largest T, hence largest N) first: better packing.
    for t in reversed(truncations):
        for seed in seeds:
            for sg in (False, True):
                jobs.append(
                    {
                        "truncation": t,
                        "synthetic_gradient": sg,
                        "steps": args.steps,
                        "seed": seed,
                        "units": args.units,
                        "start_length": args.start_length,
                        "max_length": MAX_LENGTH,
                        "batch_size": args.batch_size,
                        "learning_rate": args.learning_rate,
                        "sg_learning_rate": args.sg_learning_rate,
                        "sg_input_normalization": norm,
                    }
                )
    records = []
    start = time.time()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = [pool.submit(_run, job) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            kwargs, result = future.result()
            record = {**kwargs, **result}
            records.append(record)
            method = "DNI" if kwargs["synthetic_gradient"] else "truncated BPTT"
            print(
                f"T={kwargs['truncation']} {method} seed={kwargs['seed']}: "
                f"N={result['max_length']} ({result['seconds']:.0f} s)",
                flush=True,
            )
    records.sort(key=lambda r: (r["truncation"], r["seed"], r["synthetic_gradient"]))
    print()
    print(
        f"Copy task, largest N solved (< 0.15 bits/step) in {args.steps} steps, "
        f"LSTM {args.units}, batch {args.batch_size}, Adam "
        f"{args.learning_rate:g} (M: {args.sg_learning_rate or 'default'}), "
        f"M input normalization {norm}, curriculum from N={args.start_length}; "
        f"{time.time() - start:.0f} s in all."
    )
    print()
    print(_table(records, truncations, seeds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
