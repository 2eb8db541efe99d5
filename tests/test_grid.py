"""The robustness grid (`bench grid`) and the depth probe, on tiny budgets."""

import json
import os

import pytest

from keras_dni.benchmarks import cli
from keras_dni.benchmarks import depth_probe
from keras_dni.benchmarks import grid


def test_grid_small_writes_records_table_and_heat_map(tmp_path, capsys):
    out = str(tmp_path / "grid")
    cli.main(
        [
            "grid",
            "--small",
            "--seeds",
            "1",
            "--methods",
            "backprop,cdni,dni-bottom",
            "--out",
            out,
        ]
    )
    with open(os.path.join(out, "results.json")) as f:
        records = json.load(f)
    cells = [c["name"] for c in grid.SMALL_CELLS]
    assert sorted({r["cell"] for r in records}) == sorted(cells)
    assert {r["method"] for r in records} == {"backprop", "cdni", "dni-bottom"}
    for record in records:
        assert len(record["metrics"]["curve"]) == record["config"]["epochs"]
        assert 0.0 <= grid.main_score(record) <= 1.0
    # Each run was also logged as it ended.
    with open(os.path.join(out, "runs.jsonl")) as f:
        assert len(f.read().splitlines()) == len(records)
    assert os.path.exists(os.path.join(out, "grid.png"))
    printed = capsys.readouterr().out
    assert "| cell | backprop | cdni | dni-bottom | collapsed |" in printed
    assert "binary-addition-2x16-sigmoid-b64 *" in printed  # held-out mark


def test_grid_table_gap_and_collapse_count():
    def record(cell, method, seed, accuracy):
        return {
            "task": "grid",
            "cell": cell,
            "method": method,
            "seed": seed,
            "metrics": {"accuracy": accuracy},
            "config": {"held_out": False},
        }

    records = [record("c", "backprop", s, 0.9) for s in range(2)] + [
        record("c", "dni", 0, 0.1),
        record("c", "dni", 1, 0.7),
    ]
    table = grid.grid_table(records)
    assert "| c | 90.0 ± 0.0 | 40.0 ± 30.0 (-50.0) | 1 |" in table


def test_grid_rejects_unknown_cells_and_methods(tmp_path):
    with pytest.raises(ValueError, match="Received: \\['nope'\\]"):
        cli.main(["grid", "--small", "--cells", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli.main(["grid", "--small", "--methods", "bp", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="Received: method='bp'"):
        grid.run_cell(grid.SMALL_CELLS[0], "bp", 0, small=True)


def test_grid_cells_cover_the_axes():
    cells = grid.CELLS
    assert len(cells) >= 12
    assert {c["task"] for c in cells} == {
        "digits",
        "mnist5k",
        "mnist1d",
        "binary-addition",
    }
    assert min(c["depth"] for c in cells) == 2
    assert max(c["depth"] for c in cells) == 10
    assert {c["activation"] for c in cells} == {"relu", "tanh", "sigmoid"}
    assert min(c["width"] for c in cells) == 64
    assert max(c["width"] for c in cells) == 1024
    assert {32, 256} <= {c["batch_size"] for c in cells}
    assert sum(c["held_out"] for c in cells) >= 3


def test_depth_cells_are_the_depth_targets():
    # Issue 13's depth targets: every combination, main-grid cells reused.
    combos = {
        (c["task"], c["depth"], c["width"], c["batch_size"]) for c in grid.DEPTH_CELLS
    }
    assert combos == {
        (task, depth, width, batch)
        for task in ("digits", "mnist5k")
        for depth in (6, 10)
        for width in (128, 256)
        for batch in (64, 128)
    }
    main = {c["name"]: c for c in grid.CELLS}
    for cell in grid.DEPTH_CELLS:
        assert cell["activation"] == "relu"
        assert cell == main.get(cell["name"], {**cell, "held_out": True})


def test_depth_probe_reports_per_layer_cosines(capsys):
    depth_probe.main(
        [
            "--method",
            "cdni",
            "--depth",
            "2",
            "--width",
            "8",
            "--epochs",
            "1",
            "--monitor-every",
            "2",
            "--batch-norm",
        ]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["sg_cosine"]) == {"hidden_0", "hidden_1"}
    assert set(result["sg_loss"]) == {"hidden_0", "hidden_1"}
    assert 0.0 <= result["accuracy"] <= 1.0


def test_he_methods_initialise_every_hidden_kernel_with_he_normal():
    import keras

    from keras_dni.benchmarks import models

    for method in ("backprop", "cdni"):
        model = models.build_mlp(
            method, 8, 3, "softmax", width=4, kernel_initializer="he_normal"
        )
        hidden = [x for x in model.layers if x.name.startswith("hidden_")]
        assert len(hidden) == 3
        for layer in hidden:
            assert isinstance(layer.kernel_initializer, keras.initializers.HeNormal)
        # Without it: Keras' default for `Dense`, and `DNIDense`'s "auto"
        # (He normal for ReLU, Glorot uniform otherwise).
        for activation, dni_default in (
            ("relu", keras.initializers.HeNormal),
            ("tanh", keras.initializers.GlorotUniform),
        ):
            default = models.build_mlp(
                method, 8, 3, "softmax", width=4, activation=activation
            )
            expected = (
                keras.initializers.GlorotUniform
                if method == "backprop"
                else dni_default
            )
            assert isinstance(
                default.get_layer("hidden_0").kernel_initializer, expected
            )
    record = grid.run_cell(grid.SMALL_CELLS[0], "cdni-he", 0, small=True)
    assert record["config"]["kernel_initializer"] == "he_normal"
    assert record["method"] == "cdni-he"


def test_depth_probe_layer_stats_initialiser_and_ridge(capsys):
    import keras

    from keras_dni.synthetic_gradient import SOLVER_RIDGE

    argv = ["--method", "cdni", "--depth", "2", "--width", "8", "--epochs", "2"]
    extra = ["--kernel-initializer", "he_normal", "--solver-ridge", "0.01"]
    depth_probe.main(argv + extra + ["--layer-stats"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["config"]["kernel_initializer"] == "he_normal"
    assert result["config"]["solver_ridge"] == 0.01
    assert [s["epoch"] for s in result["layer_stats"]] == [1, 2]
    for stats in result["layer_stats"]:
        assert len(stats["inactive"]) == len(stats["rms"]) == 2
        assert all(0.0 <= f <= 1.0 for f in stats["inactive"])
        assert all(r >= 0.0 for r in stats["rms"])
    # The options reach the layers (and the defaults are the library's:
    # `DNIDense`'s "auto" initialiser is He normal for these ReLU layers).
    glorot = ["--kernel-initializer", "glorot_uniform"]
    for args, init, ridge in (
        (argv + extra, keras.initializers.HeNormal, 0.01),
        (argv, keras.initializers.HeNormal, SOLVER_RIDGE),
        (argv + glorot, keras.initializers.GlorotUniform, SOLVER_RIDGE),
    ):
        model = depth_probe.build(depth_probe.make_parser().parse_args(args), 4)
        for layer in model.layers[:2]:
            assert isinstance(layer.kernel_initializer, init)
            assert layer.synthetic_gradient.solver_ridge == ridge
    with pytest.raises(SystemExit):
        depth_probe.main(["--solver-ridge", "0"])


def test_depth_probe_trace_and_prediction_clip(capsys):
    from keras_dni.synthetic_gradient import PREDICTION_CLIP

    argv = ["--method", "cdni", "--depth", "2", "--width", "8", "--epochs", "2"]
    argv += ["--batch-size", "512"]
    depth_probe.main(argv + ["--trace-epochs", "2", "--prediction-clip", "none"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["config"]["prediction_clip"] is None
    trace = result["trace"]
    # Every step of epoch 2 (the digits training split in batches of 512).
    assert [r["step"] for r in trace] == list(range(1, len(trace) + 1))
    assert len(trace) >= 2 and all(r["epoch"] == 2 for r in trace)
    for record in trace:
        assert record["loss"] > 0
        assert len(record["true_rms"]) == len(record["sent_rms"]) == 2
        assert all(-1.0 <= c <= 1.0 for c in record["cosine"])
    for value, expected in (("0.5", 0.5), ("none", None), (None, PREDICTION_CLIP)):
        extra = [] if value is None else ["--prediction-clip", value]
        model = depth_probe.build(depth_probe.make_parser().parse_args(argv + extra), 4)
        for layer in model.layers[:2]:
            assert layer.synthetic_gradient.prediction_clip == expected
    for bad in (
        ["--prediction-clip", "0"],
        ["--trace-epochs", "3-1"],
        ["--trace-epochs", "x"],
        ["--method", "backprop", "--trace-epochs", "1"],
    ):
        with pytest.raises(SystemExit):
            depth_probe.main(bad)


def test_calibration_options_reach_the_layers():
    argv = ["--method", "dni", "--depth", "3", "--width", "4"]
    for choice, expected in (
        (None, [False] * 3),
        ("all", [True] * 3),
        ("top", [False, False, True]),
    ):
        extra = [] if choice is None else ["--calibration", choice]
        args = depth_probe.make_parser().parse_args(argv + extra)
        model = depth_probe.build(args, 4)
        got = [layer.synthetic_gradient.calibration for layer in model.layers[:3]]
        assert got == expected, choice
    with pytest.raises(SystemExit):
        depth_probe.make_parser().parse_args(argv + ["--calibration", "yes"])
    record = grid.run_cell(grid.SMALL_CELLS[0], "dni-calibrated", 0, small=True)
    assert record["method"] == "dni-calibrated"
    assert grid._METHOD_SETUP["cdni-calibrated"][2] == {"sg_calibration": True}
    assert grid._METHOD_SETUP["dni"][2] == {}
