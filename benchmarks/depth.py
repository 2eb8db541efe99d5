"""Deep DNI vs backprop: 3 hidden layers of 256 (ReLU), Adam 1e-3, batch 64.

Measures held-out accuracy of backprop, DNI and cDNI with the same network
and budget on digits, the MNIST subset and 12-bit binary addition, over
several seeds, and prints a Markdown table (mean ± standard deviation).

    python benchmarks/depth.py --seeds 3 --epochs 30
"""

import argparse
import json
import time

import keras
import numpy as np

import keras_dni
from keras_dni import data


def build(method, input_dim, output_dim, output_activation, width, depth):
    hidden = []
    for i in range(depth):
        if method == "backprop":
            hidden.append(keras.layers.Dense(width, activation="relu"))
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
    layers.append(keras.layers.Dense(output_dim, activation=output_activation))
    if method == "backprop":
        return keras.Sequential(layers)
    return keras_dni.DNISequential(layers)


def run(task, method, seed, epochs, width=256, depth=3):
    if task == "binary-addition":
        (x, y), (xt, yt) = data.binary_addition(12, 10000, 2000, seed=0)
        out, act, loss = y.shape[1], "sigmoid", "binary_crossentropy"
    else:
        loader = data.digits if task == "digits" else data.mnist5k
        (x, y), (xt, yt) = loader()
        out, act, loss = 10, "softmax", "sparse_categorical_crossentropy"
    keras.utils.set_random_seed(seed)
    model = build(method, x.shape[1], out, act, width, depth)
    model.compile(keras.optimizers.Adam(1e-3), loss)
    start = time.time()
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    seconds = time.time() - start
    pred = model.predict(xt, batch_size=512, verbose=0)
    if task == "binary-addition":
        bits = (pred > 0.5) == (yt > 0.5)
        metrics = {
            "bit_accuracy": float(bits.mean()),
            "exact_accuracy": float(bits.all(axis=1).mean()),
        }
    else:
        metrics = {"accuracy": float((pred.argmax(1) == yt).mean())}
    metrics["train_seconds"] = seconds
    return metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default="digits,mnist5k,binary-addition")
    parser.add_argument("--methods", default="backprop,dni,cdni")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--json", default=None, help="write records here")
    args = parser.parse_args()
    records = []
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            for seed in range(args.seeds):
                metrics = run(task, method, seed, args.epochs)
                records.append(
                    {"task": task, "method": method, "seed": seed, "metrics": metrics}
                )
                print(json.dumps(records[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    print("\n| task | metric | " + " | ".join(args.methods.split(",")) + " |")
    print("|---|---|" + "---|" * len(args.methods.split(",")))
    for task in args.tasks.split(","):
        keys = [
            k
            for k in records[[r["task"] for r in records].index(task)]["metrics"]
            if k != "train_seconds"
        ]
        for key in keys:
            cells = []
            for method in args.methods.split(","):
                vals = [
                    100 * r["metrics"][key]
                    for r in records
                    if r["task"] == task and r["method"] == method
                ]
                cells.append(f"{np.mean(vals):.1f} ± {np.std(vals):.1f}")
            print(f"| {task} | {key} (%) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
