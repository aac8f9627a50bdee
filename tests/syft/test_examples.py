"""The example scripts hold each tutorial's cells as published, and run."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from tests.syft.notebook import DATA, IMPORTS, PORTED_IMPORTS, kept
from tests.syft.tutorial_code import TUTORIAL_1, TUTORIAL_2, TUTORIAL_3

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "pysyft"
CELLS = {1: TUTORIAL_1, 2: TUTORIAL_2, 3: TUTORIAL_3}


@pytest.mark.parametrize("number", [1, 2, 3])
def test_script_holds_the_published_cells_in_order(number):
    text = (EXAMPLES / f"tutorial_{number}.py").read_text()
    assert PORTED_IMPORTS in text and IMPORTS not in text and DATA not in text
    position = 0
    for cell in kept(CELLS[number]):
        found = text.find(cell, position)
        assert found >= 0, f"tutorial_{number}.py does not hold this cell as published (in order):\n{cell}"
        position = found + len(cell)


def test_docs_quote_tutorial_1_as_run():
    """docs/pysyft.md shows Tutorial 1 whole: its cells as published and the three replaced ones as run."""
    text = (REPO / "docs" / "pysyft.md").read_text()
    for cell in [PORTED_IMPORTS, *kept(TUTORIAL_1)]:
        assert cell in text, cell
    assert "examples/pysyft/tutorial_1.py" in text and "examples/pysyft/tutorial_3.py" in text


@pytest.mark.parametrize("number", [1, 2, 3])
def test_script_runs(number, shared_data, monkeypatch, capsys):
    script = EXAMPLES / f"tutorial_{number}.py"
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as `python examples/pysyft/tutorial_N.py` would
    args = ["--data-dir", str(shared_data), "--limit", "400", "--holdout", "100", "--epochs", "1"]
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "Epoch 0 - Training loss: " in out
    accuracy = "Test set: Accuracy " if number == 2 else "Accuracy on the 100 test images: "
    assert accuracy in out
    assert "bob         alice       gradient" in out  # every tutorial's first cut is alice -> bob
