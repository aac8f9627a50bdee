"""Every command refuses a bad flag with ``splitnn <command>: error: ...`` and exit 2, before any work."""

from __future__ import annotations

import pytest

import splitnn.data
from splitnn.cli.main import main


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command starts loading data (the work) before refusing its flags."""

    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the flags were checked")

    monkeypatch.setattr(splitnn.data, "load_dataset", refuse)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--limit", "0"], "--limit must be a positive integer"),
        (["--lr", "-1"], "--lr must be a positive finite number"),
        (["--lr", "nan"], "--lr must be a positive finite number"),
        (["--compression", "zip"], "--compression: compression (every cut): unknown codec 'zip'"),
        (["--compression", "activation=int8,grad=fp16"], "--compression 'activation=int8,grad=fp16': give a codec"),
        (["--compression", "gradient=topk:2"], "--compression: compression (every cut) gradient: topk ratio"),
        (["--compression", "int8", "--topology", "u-shape"], "--compression applies to the plain chain"),
        (["--seed", "12345678901234567890123"], "--seed must be an integer in 0..4294967295 (2**32 - 1), got 1234"),
        (["--seed", "-1"], "--seed must be an integer in 0..4294967295"),
        (["--retries", "-1"], "--retries must be >= 0 (reconnection attempts after a fault), got -1"),
        (["--topology", "multi", "--clients", "100000"], "100000 clients (data holders) is more than the 1024"),
        (["--topology", "splitfed", "--clients", "1025"], "1025 clients (data holders) is more than the 1024"),
    ],
)
def test_train_refuses_before_loading(argv, match, no_loading, tmp_path, capsys):
    assert main(["train", "--data-dir", str(tmp_path), "--no-download", *argv]) == 2
    err = capsys.readouterr().err
    assert f"splitnn train: error: {match}" in err, err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--max-lifetime", "-1"], "--max-lifetime must be a positive number"),
        (["--chunk-bytes", "0"], "chunk_bytes must be an integer >= 1024"),
        (["--data-listen", "7101"], "--data-listen must be HOST:PORT"),
        (["--data-listen", "h:1", "--data-advertise", "h:99999"], "--data-advertise must be HOST:PORT"),
        (["--data-advertise", "h:7101"], "--data-advertise needs --data-listen"),
    ],
)
def test_worker_refuses_before_serving(argv, match, tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("a-federation-token-of-some-length\n")
    assert main(["worker", "--name", "bob", "--token-file", str(token), *argv]) == 2
    err = capsys.readouterr().err
    assert "splitnn worker: error:" in err and match in err, err


def test_unknown_flags_name_the_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["privacy", "--limit", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "splitnn privacy: error: unrecognized arguments: --limit 3" in err
    assert "usage: splitnn privacy" in err


def test_version_flag(capsys):
    import splitnn
    from splitnn.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"splitnn {splitnn.__version__}"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--pipeline", "0"], "--pipeline must be 1..64"),
        (["--pipeline", "65"], "--pipeline must be 1..64"),
        (["--dataset", "breast-cancer", "--pipeline", "2"], "--pipeline: the breast-cancer example trains lock-step"),
        (["--weight-prediction", "0.5"], "--weight-prediction applies to pipelined training"),
        (["--pipeline", "4", "--weight-prediction", "1"], "--weight-prediction must be in [0, 1)"),
        (
            ["--pipeline", "4", "--weight-prediction", "0.5", "--topology", "u-shape"],
            "--weight-prediction applies to the plain chain",
        ),
        (["--dataset", "breast-cancer", "--standardize"], "--standardize: the breast-cancer tables are standardised"),
    ],
)
def test_train_refuses_a_bad_pipeline_before_loading(argv, match, no_loading, tmp_path, capsys):
    assert main(["train", "--data-dir", str(tmp_path), "--no-download", *argv]) == 2
    err = capsys.readouterr().err
    assert f"splitnn train: error: {match}" in err, err


def test_train_refuses_more_clients_than_samples_before_training(shared_data, capsys):
    argv = ["train", "--dataset", "fashion-mnist", "--data-dir", str(shared_data / "fashion-mnist"), "--no-download"]
    assert main([*argv, "--limit", "10", "--topology", "multi", "--clients", "11", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "splitnn train: error: --clients 11: 10 training samples cannot give each data holder one" in err, err


@pytest.mark.parametrize("command", [["compare"], ["privacy"]])
def test_other_commands_bound_the_seed_before_loading(command, no_loading, tmp_path, capsys):
    assert main([*command, "--seed", "99999999999999999999999"]) == 2
    assert f"splitnn {command[0]}: error: --seed must be an integer in 0..4294967295" in capsys.readouterr().err


def test_compare_bounds_the_clients_before_loading(no_loading, capsys):
    assert main(["compare", "--clients", "1,100000"]) == 2
    assert "splitnn compare: error: --clients 100000 is more than the 1024 data holders" in capsys.readouterr().err


def test_fit_bounds_the_seed_before_placing_data():
    from torch import nn

    import splitnn
    from splitnn.errors import ConfigurationError
    from tests.helpers import toy_dataset

    segments = [nn.Linear(4, 3), nn.Sequential(nn.Linear(3, 2), nn.LogSoftmax(dim=1))]
    model = splitnn.SplitNN(segments, [splitnn.VirtualWorker("a"), splitnn.VirtualWorker("b")])
    with pytest.raises(ConfigurationError, match=r"seed must be an integer in 0..4294967295 \(2\*\*32 - 1\), got 1"):
        model.fit(toy_dataset(8, shape=(4,), classes=2), seed=2**70, progress=False)
    assert not model.stages[0].worker.datasets()
    import numpy as np

    model.fit(toy_dataset(8, shape=(4,), classes=2), seed=np.int64(2**32 - 1), progress=False)  # numpy ints: fine
