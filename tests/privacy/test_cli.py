"""``splitnn privacy``: one table, CSV / JSON / PNGs, and errors raised before any training."""

from __future__ import annotations

import csv
import json

import pytest

from splitnn.cli.main import main
from splitnn.cli.privacy import parse_settings
from splitnn.privacy import DefenseSetting

TINY = [
    "--train-size",
    "600",
    "--aux-size",
    "300",
    "--test-size",
    "300",
    "--victims",
    "40",
    "--epochs",
    "1",
    "--decoder-epochs",
    "2",
    "--no-progress",
    "--no-download",
]


@pytest.mark.slow
def test_privacy_command_prints_table_and_writes_report(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(
        [
            "privacy",
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            str(fmnist_dir),
            "--defense",
            "nopeek,label",
            "--strengths",
            "0,1",
            "--strengths",
            "label=2",
            "--attack",
            "inversion,label-leakage,dcor",
            "--out",
            str(out),
            *TINY,
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "600 private / 300 auxiliary / 300 test samples" in text
    header = next(line for line in text.splitlines() if line.startswith("defense"))
    for col in (
        "strength",
        "test acc",
        "acc drop",
        "recon MSE",
        "recon SSIM",
        "recon acc",
        "norm AUC",
        "cos AUC",
        "dCor",
    ):
        assert col in header
    table = [line.split() for line in text.splitlines() if line.split()[:1] in (["none"], ["nopeek"], ["label"])]
    assert [(r[0], r[1]) for r in table] == [("none", "0"), ("nopeek", "0"), ("nopeek", "1"), ("label", "2")]
    assert table[0][2:] == table[1][2:]  # strength 0 is the undefended run, to the last digit
    with (out / "privacy.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["defense"] for r in rows] == ["none", "nopeek", "nopeek", "label"]
    doc = json.loads((out / "privacy.json").read_text())
    assert doc["config"]["train_size"] == 600 and len(doc["rows"]) == 4
    assert float(rows[2]["accuracy"]) == doc["rows"][2]["accuracy"]
    for png in ("privacy_tradeoff.png", "privacy_recon.png", "privacy_recon_nopeek.png", "privacy_recon_label.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_settings():
    assert parse_settings(["noise"], ["0.1,1"]) == [DefenseSetting("noise", 0.1), DefenseSetting("noise", 1.0)]
    assert parse_settings(["none,label"], ["label=3"]) == [DefenseSetting("label", 3.0)]
    assert len(parse_settings(None, None)) == 21  # three defaults for each of the seven defenses


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--defense", "nopeak"], "unknown defense 'nopeak'"),
        (["--defense", "noise", "--strengths", "label=1"], "does not include it"),
        (["--defense", "noise", "--strengths", "0,x"], "comma-separated numbers"),
        (["--defense", "noise", "--strengths", "-1"], "strength must be"),
        (["--train-size", "59000"], "not enough for 59000 private and 5000 auxiliary"),
        (["--workers", "alice,alice,alice"], "needs a cut between two parties"),
        (["--hidden", "64", "--workers", "alice,bob,bob"], "2 segments"),
        (["--victims", "20000"], "cannot exceed"),
        (["--positive-class", "10"], "not a class"),
        (["--attack", "unsplit,grn"], "unknown or no attack ['grn']"),
        (["--unsplit-rounds", "0"], "unsplit_rounds must be a positive integer"),
        (["--feature-epochs", "0"], "feature_epochs must be a positive integer"),
    ],
)
def test_bad_arguments_fail_before_training(fmnist_dir, tmp_path, capsys, argv, match):
    code = main(["privacy", "--data-dir", str(fmnist_dir), "--no-download", "--out", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and match in err
    assert not (tmp_path / "r").exists()  # nothing was written: the error came before any work


@pytest.mark.slow
def test_privacy_command_over_seeds_gives_mean_and_interval(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "seeds"
    args = ["privacy", "--data-dir", str(fmnist_dir), "--defense", "dp,label-dp,marvell,mid", "--strengths", "2"]
    args += [
        "--attack",
        "label-leakage,fsha,model-completion",
        "--fsha-steps",
        "20",
        "--seeds",
        "2",
        "--out",
        str(out),
        *TINY,
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "over 2 seeds" in text and "±" in text
    assert "a malicious label holder sends crafted gradients" in text  # who attacks whom, per column
    doc = json.loads((out / "privacy.json").read_text())
    assert doc["seeds"] == [0, 1] and doc["config"]["attacks"] == ["label-leakage", "fsha", "model-completion"]
    assert set(doc["threats"]) == {"label-leakage", "fsha", "model-completion"}
    by = {(e["defense"], e["strength"]): e for e in doc["summary"]}
    assert set(by) == {("none", 0.0), ("dp", 2.0), ("label-dp", 2.0), ("marvell", 2.0), ("mid", 2.0)}
    for entry in doc["summary"]:
        auc = entry["norm_auc"]
        assert auc["n"] == 2 and auc["low"] <= auc["mean"] <= auc["high"]
        assert entry["fsha_mse"]["n"] == 2
        assert 0.1 < entry["completion_accuracy"]["mean"] <= 1  # 40 labels, 10 classes: above chance
        assert entry["recon_mse"]["mean"] is None  # inversion did not run
    eps = by[("dp", 2.0)]["epsilon"]
    assert 1.5 < eps["mean"] <= 2.0  # the accountant's epsilon at the end of the run meets the target
    assert by[("label-dp", 2.0)]["epsilon"]["mean"] == 2.0
    assert (out / "privacy_tradeoff.png").exists() and not (out / "privacy_recon.png").exists()
