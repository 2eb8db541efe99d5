"""The benchmarks (`keras_dni.benchmarks`): CLI, smoke runs, data, tables."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_dni.benchmarks import cli
from keras_dni.benchmarks import data
from keras_dni.benchmarks import grid
from keras_dni.benchmarks import models
from keras_dni.benchmarks import report
from keras_dni.benchmarks import runs


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nope"], "unknown task 'nope'"),
        (["digits", "--methods", "backprop,sgd"], "invalid method.*sgd"),
        (["digits", "--seeds", "0"], "--seeds must be a positive integer"),
        (["digits", "--dni-layers", "1,3"], "invalid --dni-layers.*3"),
        (["timing", "--dni-layers", "1"], "--dni-layers applies to the MLP"),
        (["digits", "--arch", "rnn"], "invalid --arch 'rnn'"),
        (["mnist1d", "--arch", "cnn"], "--arch cnn applies to the tasks digits"),
        (["digits", "--arch", "cnn", "--dni-layers", "1"], "--dni-layers applies"),
        (["copy", "--start-length", "0"], "--start-length must be 'auto' or an"),
        (["copy", "--start-length", "two"], "expected 'auto' or an integer, got 'two'"),
        (["copy", "--start-length", "65"], r"--start-length must be .*\[1, 64\]"),
        (["copy", "--jobs", "0"], "--jobs must be a positive integer"),
        (["digits,nope"], "unknown task 'nope'"),
        ([","], "unknown task ','"),
        (["digits,timing", "--dni-layers", "1"], "MLP tasks .*not to 'timing'"),
        (["digits,mnist1d", "--arch", "cnn"], "not to 'mnist1d'"),
        (["digits", "--sg-prediction-clip", "0"], "--sg-prediction-clip must be"),
        (["digits", "--sg-prediction-clip", "big"], "invalid prediction_clip_value"),
    ],
)
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code != 0
    import re

    assert re.search(message, capsys.readouterr().err)


def test_module_entry_point_rejects_unknown_task():
    result = subprocess.run(
        [sys.executable, "-m", "keras_dni.bench", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "unknown task" in result.stderr


@pytest.mark.parametrize("module", ["keras_dni.bench", "keras_dni.benchmarks"])
def test_module_entry_points_print_help(module):
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert text.startswith("usage: python -m keras_dni.bench")
    assert "digits, mnist5k, mnist1d, binary-addition, copy, timing" in text


def test_console_script_target_imports():
    import configparser
    import importlib

    from keras_dni import bench

    config = configparser.ConfigParser()
    config.read(os.path.join(os.path.dirname(__file__), "..", "setup.cfg"))
    scripts = config["options.entry_points"]["console_scripts"].strip()
    name, target = (part.strip() for part in scripts.split("="))
    assert name == "keras-dni-bench"
    module, function = target.split(":")
    assert getattr(importlib.import_module(module), function) is bench.main
    assert bench.main is cli.main and bench.build_mlp is models.build_mlp


def test_tasks_map_to_runners():
    # The known tasks, in this order, with their runners; tasks may be added
    # after them (e.g. "schedules").
    known = {
        "digits": runs.mlp_runs,
        "mnist5k": runs.mlp_runs,
        "mnist1d": runs.mlp_runs,
        "binary-addition": runs.mlp_runs,
        "copy": runs.copy_runs,
        "timing": runs.timing_runs,
        "grid": grid.grid_runs,
    }
    assert cli.TASKS == tuple(cli.RUNNERS)
    assert cli.TASKS[: len(known)] == tuple(known)
    for task, runner in known.items():
        assert cli.RUNNERS[task] is runner, task
    assert all(callable(cli.RUNNERS[task]) for task in cli.TASKS)


def test_dni_layers_picks_the_decoupled_hidden_layers():
    import keras

    import keras_dni

    model = models.build_mlp("dni", 8, 3, "softmax", width=4, dni_layers=[2])
    kinds = [type(layer) for layer in model.layers]
    assert kinds[:3] == [keras.layers.Dense, keras.layers.Dense, keras_dni.DNIDense]
    every = models.build_mlp("cdni", 8, 3, "softmax", width=4)
    assert all(isinstance(layer, keras_dni.DNIDense) for layer in every.layers[:3])
    with pytest.raises(ValueError, match="dni_layers"):
        models.build_mlp("dni", 8, 3, "softmax", dni_layers=[3])


def _check_records(out_dir, task, methods):
    with open(os.path.join(out_dir, "results.json")) as f:
        records = json.load(f)
    assert {r["method"] for r in records} == set(methods)
    for record in records:
        assert set(record) >= {"task", "method", "seed", "metrics", "config"}
        assert record["task"] == task
    assert os.path.getsize(os.path.join(out_dir, f"{task}.png")) > 1000
    return records


@pytest.mark.parametrize("task", ["digits", "mnist5k", "mnist1d", "binary-addition"])
def test_smoke_mlp_tasks(task, tmp_path):
    out = str(tmp_path)
    assert (
        cli.main([task, "--small", "--seeds", "1", "--epochs", "1", "--out", out]) == 0
    )
    records = _check_records(out, task, ["backprop", "dni", "cdni"])
    for record in records:
        assert len(record["metrics"]["curve"]) == 1
        assert 0.0 <= record["metrics"]["curve"][0] <= 1.0
        assert record["config"]["sg_input_normalization"] == "auto"


@pytest.mark.parametrize("value, expected", [("layer", "layer"), ("none", None)])
def test_mlp_sg_input_normalization_option(value, expected, tmp_path):
    out = str(tmp_path)
    argv = ["digits", "--small", "--seeds", "1", "--epochs", "1", "--methods", "cdni"]
    argv += ["--sg-input-normalization", value, "--out", out]
    assert cli.main(argv) == 0
    (record,) = _check_records(out, "digits", ["cdni"])
    assert record["config"]["sg_input_normalization"] == expected


def test_mlp_prediction_clip_and_initializer_options(tmp_path, monkeypatch):
    import keras

    import keras_dni
    from keras_dni.synthetic_gradient import PREDICTION_CLIP

    built = []

    def build_mlp(*args, **kwargs):
        built.append(models.build_mlp(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(runs, "build_mlp", build_mlp)
    argv = ["digits", "--small", "--seeds", "1", "--epochs", "1", "--methods", "cdni"]
    for extra, clip, init in (
        ([], PREDICTION_CLIP, keras.initializers.HeNormal),
        (
            ["--sg-prediction-clip", "none", "--kernel-initializer", "glorot_uniform"],
            None,
            keras.initializers.GlorotUniform,
        ),
        (["--sg-prediction-clip", "0.5"], 0.5, keras.initializers.HeNormal),
    ):
        out = str(tmp_path / str(len(built)))
        assert cli.main(argv + extra + ["--out", out]) == 0
        (record,) = _check_records(out, "digits", ["cdni"])
        expected = "default" if not extra else clip
        assert record["config"]["sg_prediction_clip"] == expected
        assert record["config"]["sg_calibration"] is False
        hidden = [x for x in built[-1].layers if isinstance(x, keras_dni.DNIDense)]
        assert len(hidden) == 3
        for layer in hidden:
            assert layer.synthetic_gradient.prediction_clip == clip
            assert layer.synthetic_gradient.calibration is False
            assert isinstance(layer.kernel_initializer, init)
    out = str(tmp_path / "calibrated")
    assert cli.main(argv + ["--sg-calibration", "--out", out]) == 0
    (record,) = _check_records(out, "digits", ["cdni"])
    assert record["config"]["sg_calibration"] is True
    hidden = [x for x in built[-1].layers if isinstance(x, keras_dni.DNIDense)]
    assert all(layer.synthetic_gradient.calibration for layer in hidden)
    with pytest.raises(ValueError, match="kernel_initializer='he_normal'"):
        runs.run_mlp(
            "digits",
            "cdni",
            0,
            1,
            small=True,
            arch="cnn",
            kernel_initializer="he_normal",
        )


def test_smoke_cnn(tmp_path):
    import keras_dni

    out = str(tmp_path)
    argv = ["digits", "--arch", "cnn", "--small", "--seeds", "1", "--epochs", "1"]
    assert cli.main(argv + ["--out", out]) == 0
    with open(os.path.join(out, "results.json")) as f:
        records = json.load(f)
    assert [r["method"] for r in records] == ["backprop", "dni", "cdni"]
    assert all(r["config"]["arch"] == "cnn" for r in records)
    assert os.path.getsize(os.path.join(out, "digits-cnn.png")) > 1000
    assert "| digits-cnn | accuracy (%) |" in report.summarise(records)
    model = models.build_cnn("cdni", 8, 10)
    convs = [layer for layer in model.layers if "conv" in layer.name]
    assert all(isinstance(layer, keras_dni.DNIConv2D) for layer in convs)
    assert model.output_shape == (None, 10)
    with pytest.raises(ValueError, match="arch"):
        runs.run_mlp("digits", "dni", 0, 1, small=True, arch="rnn")
    with pytest.raises(ValueError, match="arch='cnn'"):
        runs.run_mlp("binary-addition", "dni", 0, 1, small=True, arch="cnn")


def test_smoke_several_tasks_one_table(tmp_path, capsys):
    out, path = str(tmp_path / "out"), str(tmp_path / "json" / "records.json")
    argv = ["digits,binary-addition", "--small", "--seeds", "1", "--epochs", "1"]
    argv += ["--methods", "dni", "--out", out, "--json", path]
    assert cli.main(argv) == 0
    with open(os.path.join(out, "results.json")) as f:
        records = json.load(f)
    with open(path) as f:
        assert json.load(f) == records
    assert [r["task"] for r in records] == ["digits", "binary-addition"]
    for task in ("digits", "binary-addition"):
        assert os.path.getsize(os.path.join(out, f"{task}.png")) > 1000
    printed = capsys.readouterr().out
    assert "| digits | accuracy (%) |" in printed
    assert "| binary-addition | exact_accuracy (%) |" in printed


@pytest.mark.parametrize("start_length, jobs", [("2", "1"), ("auto", "2")])
def test_smoke_copy(tmp_path, start_length, jobs, capsys):
    out = str(tmp_path)
    argv = ["copy", "--small", "--seeds", "1", "--truncations", "3", "--out", out]
    # 'auto': the first N longer than one chunk, 2 for T = 3.
    argv += ["--start-length", start_length, "--jobs", jobs]
    assert cli.main(argv) == 0
    records = _check_records(out, "copy", ["bptt", "dni"])
    assert [r["method"] for r in records] == ["bptt", "dni"]
    for record in records:
        assert record["truncation"] == 3
        assert record["config"] == {
            "steps": 20,
            "start_length": 2,
            "units": 128,
            "batch_size": 32,
            "learning_rate": 3e-3,
            "sg_learning_rate": 1e-3,
            "sg_input_normalization": None,
            "max_length": 64,
            "sg_prediction_clip": 1.0,  # DNIRNN's default, recorded
        }
        assert 0 <= record["metrics"]["max_length"] <= 64
    printed = capsys.readouterr().out
    assert "in 20 steps, LSTM 128, batch 32" in printed
    assert "| T | first N | truncated BPTT: N per seed | mean | DNI: N per" in printed
    assert "| 3 | 2 | " in printed


def _copy_record(t, method, seed, n, first):
    return {
        "task": "copy",
        "method": method,
        "seed": seed,
        "truncation": t,
        "metrics": {"max_length": n, "start_length": first},
        "config": {"steps": 10, "start_length": first},
    }


def test_copy_table_per_truncation():
    records = [
        _copy_record(t, method, seed, n, first)
        for t, first, values in [
            (5, 3, {"bptt": (0, 0), "dni": (4, 5)}),
            (2, 1, {"bptt": (1, 2), "dni": (3, 1)}),
            (8, 4, {"bptt": (0, 0), "dni": (0, 0)}),
        ]
        for method in ("dni", "bptt")
        for seed, n in enumerate(values[method])
    ]
    assert report.copy_table(records).splitlines() == [
        "| T | first N | truncated BPTT: N per seed | mean | DNI: N per seed "
        "| mean | DNI / BPTT |",
        "|---|---|---|---|---|---|---|",
        "| 2 | 1 | 1, 2 | 1.5 | 3, 1 | 2.0 | 1.33x |",
        "| 5 | 3 | 0, 0 | 0.0 | 4, 5 | 4.5 | BPTT 0 |",
        "| 8 | 4 | 0, 0 | 0.0 | 0, 0 | 0.0 | - |",
    ]
    assert report.copy_table(records) in report.summarise(records)
    dni_only = [r for r in records if r["method"] == "dni" and r["truncation"] == 2]
    assert report.copy_table(dni_only).splitlines() == [
        "| T | first N | DNI: N per seed | mean |",
        "|---|---|---|---|",
        "| 2 | 1 | 3, 1 | 2.0 |",
    ]


def test_smoke_timing(tmp_path):
    out = str(tmp_path)
    assert (
        cli.main(
            [
                "timing",
                "--small",
                "--widths",
                "32",
                "--methods",
                "backprop,dni",
                "--out",
                out,
            ]
        )
        == 0
    )
    records = _check_records(out, "timing", ["backprop", "dni"])
    assert records[0]["metrics"]["ratio_to_backprop"] == 1.0
    assert records[1]["metrics"]["step_seconds"] > 0
    assert records[1]["metrics"]["macs_ratio_to_backprop"] > 1.0


def test_step_macs_counts_the_products_of_a_step():
    # 784-512-512-10 at batch 128, counted by hand: forward and weight
    # gradient of the three layers, input gradient of the upper two.
    layers = [784, 512, 512, 10]
    products = [784 * 512, 512 * 512, 512 * 10]
    backprop = 128 * (2 * sum(products) + 512 * 512 + 512 * 10)
    assert runs.step_macs(layers, "backprop", 128) == backprop
    # A linear 512x512 M per hidden layer: forward and weight gradient.
    dni = backprop + 128 * 2 * 2 * 512 * 512
    assert runs.step_macs(layers, "dni", 128) == dni
    # cDNI adds the 10-class label projection of each M.
    cdni = dni + 128 * 2 * 2 * 10 * 512
    assert runs.step_macs(layers, "cdni", 128) == cdni
    assert round(dni / backprop, 2) == 1.65


def test_binary_addition_target_is_the_sum():
    (x, y), (xt, yt) = data.binary_addition(
        bits=8, num_examples=300, num_test=50, seed=1
    )
    for xs, ys in ((x, y), (xt, yt)):
        left, right = data.from_bits(xs[:, :8]), data.from_bits(xs[:, 8:])
        np.testing.assert_array_equal(data.from_bits(ys), left + right)
    assert data.to_bits([5], 4).tolist() == [[0, 1, 0, 1]]
    with pytest.raises(ValueError, match="distinct pairs"):
        data.binary_addition(bits=3, num_examples=20, num_test=0)
