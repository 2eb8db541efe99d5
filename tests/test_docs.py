"""The README's example and the docstring examples run as written."""

import doctest
import os
import re

import pytest

import keras_dni

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_example_runs(tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert os.path.exists(tmp_path / "model.keras")


@pytest.mark.parametrize(
    "module",
    [
        "keras_dni.synthetic_gradient",
        "keras_dni.dense",
        "keras_dni.models",
        "keras_dni.callbacks",
        "keras_dni.benchmarks.data",
        "keras_dni.conv",
        "keras_dni.conversion",
        "keras_dni.recurrent",
        "keras_dni.benchmarks.copy_task",
        "keras_dni.pipelined",
    ],
)
def test_docstring_examples(module):
    import importlib

    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0 or module == "keras_dni.models"
    assert keras_dni.__version__
