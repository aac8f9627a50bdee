"""``splitnn compare`` end to end on a Fashion-MNIST subset, and its refusals."""

from __future__ import annotations

import csv
import json

import pytest

from splitnn.cli.main import main


def _args(shared_data, tmp_path, *extra):
    return [
        "compare",
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        str(shared_data / "fashion-mnist"),
        "--no-download",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]


def test_compare_writes_table_csv_json_and_plots(shared_data, tmp_path, capsys):
    code = main(
        _args(
            shared_data,
            tmp_path,
            "--model",
            "mlp",
            "--clients",
            "1,3",
            "--epochs",
            "2",
            "--limit",
            "240",
            "--test-limit",
            "200",
        )
    )
    out = capsys.readouterr().out
    assert code == 0, out
    for header in ("method", "bytes/client", "FLOPs/client", "test acc", "wall s"):
        assert header in out
    assert "crossover" in out
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").read_text().splitlines()))
    assert [(r["method"], r["clients"]) for r in rows] == [
        (m, k) for k in ("1", "3") for m in ("split", "fedavg", "large-batch", "splitfed-v1", "splitfed-v2")
    ]
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["train_samples"] == 240 and doc["test_samples"] == 200
    assert all(r["matches_model"] for r in doc["results"])
    assert all(r["client_bytes"] == r["predicted_client_bytes"] for r in doc["results"])
    one = {r["method"]: r for r in doc["results"] if r["clients"] == 1}
    assert len({one[m]["accuracy"] for m in one}) == 1  # one client: the same centralized training
    three = {r["method"]: r for r in doc["results"] if r["clients"] == 3}
    assert three["splitfed-v1"]["client_bytes"] == three["splitfed-v2"]["client_bytes"]  # v1's tops average at bob
    for name in ("bytes_per_client.png", "flops_per_client.png", "accuracy_vs_bytes.png"):
        png = (tmp_path / "out" / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--clients", "0"], "--clients"),
        (["--clients", "1,x"], "--clients"),
        (["--epochs", "3", "--local-epochs", "2"], "multiple"),
        (["--clients", "50", "--limit", "20"], "only 20 training samples"),
        (["--methods", "split,gossip"], "gossip"),
        (["--partition", "halves"], "partition"),
        (["--limit", "0"], "--limit"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(shared_data, tmp_path, capsys, extra, message):
    assert main(_args(shared_data, tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.csv").exists()
