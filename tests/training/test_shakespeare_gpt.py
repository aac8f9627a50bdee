"""examples/shakespeare_gpt.py as written, for a handful of iterations: the U-shaped GPT (text and labels at
alice, the middle blocks at bob) trains lock-step to exactly the losses and weights of the unsplit model trained
by a plain PyTorch loop (nanoGPT's train.py: AdamW groups, get_lr, clip_grad_norm_), and only hidden states of
one batch cross each cut per step. The full 2,000-iteration recipe and its figures: docs/transformers.md."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO, SHARED_DATA


def _example():
    spec = importlib.util.spec_from_file_location("shakespeare_gpt", REPO / "examples" / "shakespeare_gpt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_the_u_shaped_gpt_equals_its_unsplit_twin(tmp_path, capsys):
    data = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not data.is_file():  # a small text of our own: the example needs only characters
        data = tmp_path / "input.txt"
        data.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200, encoding="utf-8")
    result = _example().main(["--data", str(data), "--iters", "4", "--eval-iters", "2", "--twin", "--sample", "20"])
    assert result["losses_equal"] and result["weights_equal"], capsys.readouterr().out
    assert len(result["losses"]) == 4
    hidden = 12 * 64 * 128 * 4  # one batch of hidden states, float32
    assert result["bytes_per_step"] == {
        "alice->bob (activation)": hidden,
        "bob->alice (activation)": hidden,
        "bob->alice (gradient)": hidden,
        "alice->bob (gradient)": hidden,
    }
    assert len(result["sample"]) == 21


@pytest.mark.network
def test_across_two_worker_processes_it_trains_as_in_process(tmp_path, capsys):
    """``--workers``: the same U-shape on two `splitnn worker` processes (its segments sent as ATen graphs)."""
    data = tmp_path / "input.txt"
    data.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200, encoding="utf-8")
    result = _example().main(["--data", str(data), "--iters", "3", "--eval-iters", "1", "--workers", "--sample", "0"])
    assert result["workers_losses_equal"] and result["workers_weights_equal"], capsys.readouterr().out
