"""The `throughput` bench task and the MLP tasks' `--schedule` options."""

import json
import os

import pytest

from keras_dni.benchmarks import cli
from keras_dni.benchmarks import report
from keras_dni.benchmarks import throughput


def test_throughput_task_smoke(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["throughput", "--small", "--stages", "2", "--batch-sizes", "16"]
    argv += ["--out", str(out)]
    assert cli.main(argv) == 0
    with open(os.path.join(out, "results.json")) as f:
        records = json.load(f)
    assert [r["method"] for r in records] == ["backprop", "locked", "pipelined"]
    threads = [r["config"]["tf_threads"] for r in records]
    assert threads[2] == {"intra_op": 1, "inter_op": 2}  # one thread per stage
    assert threads[0] == threads[1] and threads[0]["inter_op"] == 1
    for record in records:
        assert record["task"] == "throughput"
        config, metrics = record["config"], record["metrics"]
        assert (config["width"], config["depth"], config["batch_size"]) == (32, 4, 16)
        assert config["stages"] == 2 and config["round"] == 0
        assert metrics["examples_per_second"] == pytest.approx(
            16 / metrics["step_seconds"]
        )
    table = report.summarise(records)
    assert "pipelined / backprop" in table and "| 32 | 16 | 2 |" in table
    assert "examples/s" in capsys.readouterr().out


def test_throughput_table_ratio_is_the_median_over_rounds():
    def record(method, r, rate):
        config = {"width": 8, "batch_size": 4, "stages": 2, "sg_solver": "gradient"}
        return {
            "task": "throughput",
            "method": method,
            "metrics": {"examples_per_second": rate},
            "config": {**config, "round": r},
        }

    records = [
        record("backprop", 0, 100.0),
        record("pipelined", 0, 150.0),
        record("backprop", 1, 50.0),
        record("pipelined", 1, 100.0),
        record("backprop", 2, 100.0),
        record("pipelined", 2, 110.0),
    ]
    table = throughput.throughput_table(records)
    # Per round: 1.5, 2.0, 1.1; the median is 1.5 (not 360 / 250 = 1.44).
    assert "x1.50 (1.10-2.00)" in table
    assert "| 8 | 4 | 2 | gradient | 100 | 110 |" in table


@pytest.mark.parametrize("schedule", ["unlocked", "pipelined"])
def test_mlp_task_with_a_schedule(schedule, tmp_path, capsys):
    argv = ["digits", "--small", "--seeds", "1", "--epochs", "1"]
    argv += ["--methods", "backprop,cdni", "--schedule", schedule]
    argv += ["--update-probability", "0.5", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    with open(os.path.join(tmp_path, "results.json")) as f:
        records = json.load(f)
    by_method = {r["method"]: r["config"] for r in records}
    assert by_method["cdni"]["schedule"] == schedule
    assert by_method["cdni"]["update_probability"] == 0.5
    assert by_method["backprop"]["schedule"] == "locked"
    assert f"| digits-{schedule}-p0.5 |" in capsys.readouterr().out


def test_update_probability_out_of_range_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["digits", "--update-probability", "0"])
    assert "--update-probability must be in (0, 1]" in capsys.readouterr().err
