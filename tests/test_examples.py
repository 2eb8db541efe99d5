"""The examples run: each script's `--smoke` mode, as a user would start it.

Each test runs `python examples/<script> --smoke` in a subprocess from the
repository root, checks that it exits with 0 and prints its key results,
and that it writes only under the `--out` directory it is given.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(script, *args):
    """Runs `examples/<script> --smoke *args`; returns its standard output."""
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        KERAS_BACKEND="tensorflow",
        CUDA_VISIBLE_DEVICES="-1",
        MPLBACKEND="Agg",
    )
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--smoke", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard only: a smoke run takes seconds
    )
    assert result.returncode == 0, (
        f"{script} --smoke exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout[-4000:]}\n"
        f"--- stderr ---\n{result.stderr[-4000:]}"
    )
    return result.stdout


def load_example(script):
    """Imports an example as a module (named `example_<name>`)."""
    name = "example_" + Path(script).stem
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_has_a_test():
    tested = {
        "convert_finetune_export.py",
        "copy_task_rnn.py",
        "mnist_cnn.py",
        "mnist_mlp.py",
        "tensorboard.py",
        "tutorial_binary_addition.py",
    }
    assert {path.name for path in EXAMPLES.glob("*.py")} == tested


def test_tutorial_binary_addition(tmp_path):
    out = run_example("tutorial_binary_addition.py", "--out", tmp_path)
    for activation in ("sigmoid", "relu"):
        for method in ("backprop", "DNI", "cDNI"):
            assert f"| {activation} | {method} |" in out
    # The tutorial's own figures stand beside the sigmoid rows.
    assert "99.65 / 95.9" in out  # backprop
    assert "72.8 / 19.0" in out  # DNI
    assert "50.4 / 0.0" in out  # the last program, beside cDNI
    assert [p.name for p in tmp_path.iterdir()] == ["learning_curves.png"]
    assert (tmp_path / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tutorial_binary_addition_sg_solver(tmp_path):
    # `--sg-solver gradient`: the tutorial's own rule (an `sg_optimizer` step
    # per batch) instead of the least-squares default.
    out = run_example(
        "tutorial_binary_addition.py",
        "--sg-solver",
        "gradient",
        "--methods",
        "DNI,cDNI",
        "--activations",
        "relu",
        "--out",
        tmp_path,
    )
    assert "sg_solver='gradient'" in out
    assert "| relu | DNI |" in out and "| relu | cDNI |" in out


@pytest.mark.parametrize("solver", ["auto", "least_squares", "gradient"])
def test_tutorial_build_model_passes_sg_solver(solver):
    tutorial = load_example("tutorial_binary_addition.py")
    model = tutorial.build_model("cDNI", "sigmoid", 8, solver)
    for name in ("layer_1", "layer_2"):
        assert model.get_layer(name).synthetic_gradient.solver == solver


def test_mnist_mlp():
    out = run_example("mnist_mlp.py")
    for method in ("backprop", "DNI", "cDNI"):
        assert f"{method:8s} seed 0: held-out accuracy" in out
        assert f"| {method} |" in out


def test_mnist_cnn():
    out = run_example("mnist_cnn.py")
    for method in ("backprop", "DNI", "cDNI"):
        assert f"| {method:8s} |" in out


def test_convert_finetune_export(tmp_path):
    out = run_example("convert_finetune_export.py", "--out", tmp_path)
    for stage in ("1. backprop", "2. apply_dni", "3. cDNI fine-tuning", "4. strip_dni"):
        assert stage in out
    assert "2. apply_dni: same predictions as the backprop model" in out
    assert "SavedModel predictions equal the stripped Keras model's" in out
    assert [p.name for p in tmp_path.iterdir()] == ["saved_model"]
    assert (tmp_path / "saved_model" / "saved_model.pb").is_file()


def test_copy_task_rnn():
    out = run_example("copy_task_rnn.py")
    assert "| truncated BPTT |" in out
    assert "| DNI |" in out


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason="the TensorBoard callback needs the `tensorboard` package",
)
def test_tensorboard(tmp_path):
    out = run_example("tensorboard.py", "--out", tmp_path)
    assert "Scalar tags:" in out
    assert [p.name for p in tmp_path.iterdir()] == ["logs"]
    # Read the event files back here, with the example's reader.
    tags = load_example("tensorboard.py").scalar_tags(tmp_path / "logs")
    assert any(tag.startswith("epoch_sg_loss_") for tag in tags), tags
    assert any(tag.startswith("epoch_sg_cosine_") for tag in tags), tags
