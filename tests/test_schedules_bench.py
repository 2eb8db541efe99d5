"""The `schedules` bench task (`keras_dni.benchmarks.schedules_bench`)."""

import json
import os

import pytest

from keras_dni.benchmarks import cli
from keras_dni.benchmarks import report
from keras_dni.benchmarks import schedules_bench


def test_decoupling_layers_make_stages_of_equal_depth():
    assert schedules_bench.decoupling_layers(8, 8) == [0, 1, 2, 3, 4, 5, 6]
    assert schedules_bench.decoupling_layers(8, 4) == [1, 3, 5]
    assert schedules_bench.decoupling_layers(8, 2) == [3]
    assert schedules_bench.decoupling_layers(8, 1) == []
    with pytest.raises(ValueError, match="divisor of the depth 8"):
        schedules_bench.decoupling_layers(8, 3)


def test_activation_bytes_of_network_and_largest_stage():
    whole, largest = schedules_bench.activation_bytes(128, 8, 1024, 4)
    assert whole == 4 * 128 * (8 * 1024 + 10)
    assert largest == 4 * 128 * (2 * 1024 + 10)


def test_schedules_task_smoke(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["schedules", "--small", "--stages", "2", "--batch-sizes", "16"]
    argv += ["--out", str(out), "--json", str(tmp_path / "copy.json")]
    assert cli.main(argv) == 0
    with open(os.path.join(out, "results.json")) as f:
        records = json.load(f)
    assert [r["method"] for r in records] == ["backprop", "locked", "unlocked"]
    for record in records:
        assert set(record) >= {"task", "method", "seed", "metrics", "config"}
        assert record["task"] == "schedules" and record["seed"] == 0
        metrics = record["metrics"]
        assert {
            "rss_peak_above_inference_mib",
            "activations_whole_mib",
            "activations_largest_stage_mib",
            "step_seconds",
        } <= set(metrics)
        assert "tf_step_peak_mib" in metrics or "tf_memory_info_error" in metrics
        config = record["config"]
        assert config["batch_size"] == 16 and config["depth"] == 4
        assert config["steps"] == 2
    assert [r["config"]["stages"] for r in records] == [1, 2, 2]
    assert records[1]["config"]["dni_layers"] == [1]
    with open(tmp_path / "copy.json") as f:
        assert json.load(f) == records
    table = report.summarise(records)
    assert "| batch | stages | method |" in table
    assert "| 16 | 2 | unlocked |" in table
    assert "peak RSS above inference" in capsys.readouterr().out
    # The default: least squares for the linear gradient models.
    assert [r["config"]["sg_solver"] for r in records] == [
        None,
        "least_squares",
        "least_squares",
    ]


def test_schedules_task_passes_the_solver(tmp_path):
    argv = ["schedules", "--small", "--methods", "dni", "--stages", "2"]
    argv += ["--batch-sizes", "16", "--sg-solver", "gradient", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    with open(os.path.join(tmp_path, "results.json")) as f:
        records = json.load(f)
    assert [r["config"]["sg_solver"] for r in records] == ["gradient", "gradient"]


def test_schedules_rejects_a_stage_count_that_does_not_divide_the_depth(tmp_path):
    argv = ["schedules", "--stages", "3", "--out", str(tmp_path)]
    with pytest.raises(ValueError, match="divisor of the depth 8"):
        cli.main(argv)
