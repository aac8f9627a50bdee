"""The README's examples run as written (docs are part of the feature)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_python_api_example_runs(shared_data, monkeypatch, tmp_path, capsys):
    """The "Python API" example, verbatim: 5 epochs of Fashion-MNIST, evaluate, collect, save, load."""
    monkeypatch.setenv("SPLITNN_DATA", str(shared_data))
    monkeypatch.setenv("SPLITNN_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_python_block_after("## Python API"), "README.md", "exec"), scope)
    out = capsys.readouterr().out
    assert scope["history"].final.test_accuracy >= 0.84
    assert "accuracy" in out and "alice" in out and "activation" in out
    assert (tmp_path / "model.safetensors").is_file()
    x = scope["test"].features[:8]
    assert scope["again"](x).equal(scope["full"](x))
