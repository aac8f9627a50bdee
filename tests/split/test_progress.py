"""Long work is never silent, and redirected output holds no progress-bar frames: ``fit`` shows a bar where one
renders (a terminal, a notebook), plain heartbeat and epoch lines elsewhere, nothing when told so."""

from __future__ import annotations

import io
import sys
import types

import pytest
import torch
from torch import nn

import splitnn
from splitnn.cli.main import main
from splitnn.errors import ConfigurationError
from splitnn.split.progress import progress_mode
from tests.helpers import toy_dataset

DATA = toy_dataset(96, shape=(1, 4, 4), classes=3)


def model():
    torch.manual_seed(0)
    return splitnn.SplitNN(
        [nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 3), nn.LogSoftmax(1))],
        [splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")],
    )


@pytest.fixture
def every_batch(monkeypatch):
    monkeypatch.setattr("splitnn.split.progress.HEARTBEAT_SECONDS", 0.0)  # a heartbeat after every batch


def test_redirected_fit_prints_heartbeat_and_epoch_lines_without_bar_frames(capsys, every_batch):
    model().fit(DATA, epochs=2, batch_size=32, test_data=DATA)  # default progress; stderr is captured: no terminal
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert [line.split(",")[0] for line in lines if "batch" in line] == [
        f"epoch {e}/2: batch {b}/3" for e in (1, 2) for b in (1, 2, 3)
    ]
    done = [line for line in lines if "done" in line]
    assert len(done) == 2 and done[0].startswith("epoch 1/2: done, loss ") and "test accuracy 0." in done[0]


def test_lines_mode_leaves_the_epoch_lines_to_on_epoch_and_false_prints_nothing(capsys, every_batch):
    seen = []
    model().fit(DATA, epochs=1, batch_size=32, progress="lines", on_epoch=seen.append)
    err = capsys.readouterr().err
    assert len(seen) == 1 and "epoch 1/1: batch 3/3" in err and "done" not in err
    model().fit(DATA, epochs=1, batch_size=32, progress=False)
    assert capsys.readouterr().err == ""


def test_heartbeats_are_bounded_in_time_not_printed_per_batch(capsys):
    model().fit(DATA, epochs=1, batch_size=8, progress="lines")  # 12 quick batches, well under 30 s
    err = capsys.readouterr().err
    assert "batch" not in err and err.startswith("epoch 1/1: done")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_where_one_renders_a_terminal_or_a_notebook(monkeypatch):
    assert progress_mode(None, Terminal()) == "bar" and progress_mode(True, Terminal()) == "bar"
    assert progress_mode(None, io.StringIO()) == "lines" and progress_mode(True, io.StringIO()) == "lines"
    assert progress_mode(False, Terminal()) == "off" and progress_mode("lines", Terminal()) == "lines"
    kernel = types.SimpleNamespace(kernel=object())  # what a Jupyter kernel's shell has
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: kernel
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    assert progress_mode(None, io.StringIO()) == "bar"
    with pytest.raises(ConfigurationError, match='progress must be True, False, None \\(automatic\\) or "lines"'):
        model().fit(DATA, progress="bars")


def test_a_terminal_fit_draws_its_bar(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    model().fit(DATA, epochs=1, batch_size=32)
    assert "epoch 1/1" in term.getvalue() and "batch" in term.getvalue()


@pytest.mark.parametrize("flags", [["--no-progress"], []], ids=["no-progress", "redirected"])
def test_the_train_command_redirected_has_lines_and_no_frames(flags, shared_data, capsys, every_batch):
    argv = ["train", "--dataset", "fashion-mnist", "--data-dir", str(shared_data / "fashion-mnist"), "--no-download"]
    assert main([*argv, "--limit", "256", "--epochs", "1", *flags]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out
    assert "epoch 1/1: batch 4/4" in captured.err  # the heartbeat (here after every batch)
    assert "epoch 1/1  loss" in captured.out  # the command's own epoch line
    assert "every transfer of the run (training and evaluation; each epoch's 'sent' counts its training only)" in (
        captured.out
    )
