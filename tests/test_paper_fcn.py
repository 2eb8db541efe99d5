"""`bench paper-fcn`: the paper's feed-forward protocol, on a tiny budget."""

import json
import os

import pytest

from keras_dni.benchmarks import cli
from keras_dni.benchmarks import paper_fcn


def test_paper_fcn_small_honours_methods_and_depths(tmp_path, capsys):
    out = str(tmp_path / "paper")
    argv = [
        "paper-fcn",
        "--small",
        "--seeds",
        "1",
        "--depths",
        "3,4",
        "--datasets",
        "mnist1d",
        "--iterations",
        "4",
        "--methods",
        "backprop,cdni",
        "--out",
        out,
    ]
    cli.main(argv)
    with open(os.path.join(out, "results.json")) as f:
        records = json.load(f)
    assert {r["task"] for r in records} == {"paper-fcn"}
    assert sorted((r["config"]["depth"], r["method"]) for r in records) == [
        (3, "backprop"),
        (3, "cdni"),
        (4, "backprop"),
        (4, "cdni"),
    ]
    for record in records:
        metrics, config = record["metrics"], record["config"]
        assert config["dataset"] == "mnist1d"
        assert config["iterations"] == 4
        assert metrics["curve_steps"][-1] == 4
        assert len(metrics["curve"]) == len(metrics["curve_steps"])
        assert metrics["accuracy"] == metrics["curve"][-1]
        assert 0.0 <= metrics["accuracy"] <= 1.0
    # Each run was logged as it ended; the table and the plot were written.
    with open(os.path.join(out, "runs.jsonl")) as f:
        assert len(f.read().splitlines()) == len(records)
    assert os.path.exists(os.path.join(out, "paper_fcn.png"))
    with open(os.path.join(out, "paper_fcn.md")) as f:
        table = f.read()
    assert table.startswith("| data | depth | backprop | cdni |")
    assert "| mnist1d | 3 |" in table and "| mnist1d | 4 |" in table
    assert "| data | depth | backprop | cdni |" in capsys.readouterr().out
    # Run again into the same folder: the logged runs are reused, not retrained.
    cli.main(argv)
    assert "reusing 4 runs" in capsys.readouterr().out
    with open(os.path.join(out, "runs.jsonl")) as f:
        assert len(f.read().splitlines()) == len(records)
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f) == records


def test_paper_fcn_builds_the_protocol_per_method():
    import keras_dni

    for method, hidden in (("dni", (1024, 1024)), ("cdni", ())):
        model = paper_fcn.build_paper_fcn(method, 40, depth=3)
        sgs = keras_dni.models.synthetic_gradient_layers(model)
        assert len(sgs) == 3
        assert all(sg.hidden_units == hidden for sg in sgs)
        assert all(sg.conditional == (method == "cdni") for sg in sgs)
    backprop = paper_fcn.build_paper_fcn("backprop", 40, depth=5)
    assert sum(layer.name.startswith("bn_") for layer in backprop.layers) == 5


def test_paper_fcn_table_gap_and_seeds():
    def record(method, seed, accuracy, depth=3):
        return {
            "task": "paper-fcn",
            "method": method,
            "seed": seed,
            "metrics": {"accuracy": accuracy},
            "config": {"dataset": "mnist5k", "depth": depth},
        }

    records = [record("backprop", s, 0.9) for s in range(2)] + [
        record("dni", 1, 0.8),
        record("dni", 0, 0.6),
    ]
    table = paper_fcn.paper_fcn_table(records)
    assert (
        "| mnist5k | 3 | 90.0 ± 0.0 [90.0, 90.0] | 70.0 ± 10.0 (-20.0) [60.0, 80.0] |"
        in table
    )


def test_paper_fcn_rejects_bad_options(tmp_path):
    for flag, value in (("--datasets", "mnist"), ("--depths", "0")):
        with pytest.raises(ValueError, match="Received"):
            cli.main(["paper-fcn", "--small", flag, value, "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="method"):
        paper_fcn.build_paper_fcn("bp", 40, depth=3)
