from __future__ import annotations

import json

import pytest
import torch

from splitnn.cli.main import main
from splitnn.split.persist import load_model


def test_train_command_reports_and_saves(shared_data, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    hist = tmp_path / "history.json"
    code = main(
        [
            "train",
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            str(shared_data / "fashion-mnist"),
            "--epochs",
            "2",
            "--limit",
            "1500",
            "--no-progress",
            "--save",
            str(out),
            "--json",
            str(hist),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "784-128-640-10 on alice -> bob -> claire" in text
    assert "epoch 1/2" in text and "epoch 2/2" in text
    assert "alice" in text and "claire" in text and "test acc" in text
    epochs = json.loads(hist.read_text())
    assert [e["epoch"] for e in epochs] == [1, 2]
    # alice sends the 128-wide activation of each of the 1500 samples per epoch, nothing else.
    assert epochs[0]["bytes_sent"]["alice"] == 1500 * 128 * 4
    model = load_model(out)
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_train_command_compresses_at_the_cuts(shared_data, tmp_path, capsys):
    hist = tmp_path / "history.json"
    argv = ["train", "--dataset", "fashion-mnist", "--data-dir", str(shared_data / "fashion-mnist"), "--epochs", "1"]
    code = main([*argv, "--limit", "640", "--no-progress", "--compression", "int8", "--json", str(hist)])
    text = capsys.readouterr().out
    assert code == 0 and "compression int8" in text
    assert "raw bytes" in text  # the ledger table shows the raw size beside the bytes sent
    # alice sends int8 codes of the 128-wide activation: 10 batches of 64 rows, 8 bytes of scale and
    # zero point per row, and a 24-byte payload header per batch
    assert json.loads(hist.read_text())[0]["bytes_sent"]["alice"] == 10 * (64 * 128 + 64 * 8 + 24)


def test_train_command_custom_hidden_and_shared_worker(shared_data, capsys):
    code = main(
        [
            "train",
            "--dataset",
            "mnist",
            "--data-dir",
            str(shared_data / "mnist"),
            "--epochs",
            "1",
            "--hidden",
            "32",
            "--workers",
            "alice,bob",
            "--no-progress",
            "--no-download",
        ]
    )
    captured = capsys.readouterr()
    # MNIST's training set is not in shared/: the error names what is missing and how to fix it.
    assert code == 2
    assert "train" in captured.err and "--data-dir" in captured.err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--hidden", "12,x"], "--hidden"),
        (["--workers", "alice,bob"], "one worker per segment"),
        (["--save", "/nonexistent-dir/m.safetensors"], "does not exist"),
    ],
)
def test_train_command_refuses_bad_flags_before_loading_data(argv, match, capsys, tmp_path):
    code = main(["train", "--data-dir", str(tmp_path), "--no-download", *argv])
    assert code == 2
    assert match in capsys.readouterr().err


def test_train_command_pipelined(shared_data, tmp_path, capsys):
    hist = tmp_path / "history.json"
    code = main(
        [
            "train",
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            str(shared_data / "fashion-mnist"),
            "--epochs",
            "1",
            "--limit",
            "640",
            "--pipeline",
            "4",
            "--weight-prediction",
            "0.5",
            "--standardize",
            "--no-progress",
            "--json",
            str(hist),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert (
        "batch 64, SGD lr 0.03, pipeline 4, weight prediction 0.5, standardised inputs" in text and "test acc" in text
    )
    assert json.loads(hist.read_text())[0]["bytes_sent"]["alice"] == 640 * 128 * 4  # as lock-step
