"""Deep DNI vs backprop (issue: "DNI that learns at depth").

3 hidden layers of 256 (ReLU), Adam 1e-3, batch 64, 30 epochs; backprop, DNI
and cDNI with the same network and budget on digits, the 5,000-image MNIST
subset and 12-bit binary addition (held-out pairs), over 3 seeds. A thin
wrapper around `python -m keras_dni.bench`; prints one Markdown table.

    python benchmarks/depth.py [--seeds 3] [--epochs 30] [--out results/depth]
"""

import argparse
import json
import os

from keras_dni import bench


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default="results/depth")
    parser.add_argument("--tasks", default="digits,mnist5k,binary-addition")
    args = parser.parse_args()
    records = []
    for task in args.tasks.split(","):
        out = os.path.join(args.out, task)
        bench.main(
            [
                task,
                "--seeds",
                str(args.seeds),
                "--epochs",
                str(args.epochs),
                "--out",
                out,
            ]
        )
        with open(os.path.join(out, "results.json")) as f:
            records.extend(json.load(f))
    print("\nAll tasks:\n")
    print(bench.summarise(records))


if __name__ == "__main__":
    main()
