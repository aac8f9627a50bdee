"""The vertical health example: two hospitals and a lab, aligned by PSI, reach the issue's targets."""

from __future__ import annotations

import csv

import pytest

from splitnn.accounting import RESEARCHER
from splitnn.cli.main import main
from splitnn.experiments.health import HOSPITALS, LAB, HealthConfig, run_vertical_health, write_breast_cancer_tables


def test_each_party_holds_its_own_share_in_its_own_order(tmp_path):
    files = write_breast_cancer_tables(tmp_path, seed=0)
    rows = {}
    for party, path in files.items():
        with open(path) as fh:
            table = list(csv.reader(fh))
        rows[party] = [r[0] for r in table[1:]]
        assert len(table[0]) == (2 if party == LAB else 16)  # id + diagnosis, or id + 15 features
        assert len(rows[party]) == round(0.9 * 569)
    assert len({tuple(r) for r in rows.values()}) == 3  # different patients / orders per party
    common = set.intersection(*(set(r) for r in rows.values()))
    assert 380 < len(common) < 440  # about 0.9^3 of 569


@pytest.mark.slow
def test_health_example_reaches_the_targets():
    report = run_vertical_health(HealthConfig(seed=0))
    assert report.psi.size == report.psi.parts["patients:train"] + report.psi.parts["patients:test"]
    assert report.test["auc"] >= 0.98
    assert abs(report.test["auc"] - report.central_test["auc"]) <= 0.01
    ledger = report.ledger
    for hospital in HOSPITALS:
        assert ledger.total(src=hospital, dst=LAB, kind="psi") > 0
        assert ledger.total(src=LAB, dst=hospital, kind="psi") > 0
        assert ledger.total(src=hospital, dst=LAB, kind="activation") > 0
    assert ledger.total(src=HOSPITALS[0], dst=HOSPITALS[1]) == ledger.total(src=HOSPITALS[1], dst=HOSPITALS[0]) == 0
    assert ledger.total(dst=RESEARCHER) == 0  # metrics come back as values, not outputs


def test_cli_runs_the_health_example(capsys):
    code = main(["train", "--dataset", "breast-cancer", "--topology", "vertical", "--epochs", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "private set intersection:" in out and "common patients" in out
    assert "test auc" in out and "central (joined table)" in out
    assert "psi" in out and "hospital_a" in out


@pytest.mark.parametrize(
    "argv, match",
    [
        ([], "--topology vertical"),
        (["--topology", "vertical", "--clients", "3"], "drop --clients"),
        (["--topology", "vertical", "--workers", "grpc://127.0.0.1:1"], "the three grpc:// addresses"),
        (["--topology", "vertical", "--workers", "a,b,c"], "the three grpc:// addresses"),
        (["--topology", "vertical", "--hidden", "16,8"], "one hidden width"),
    ],
)
def test_cli_refuses_what_the_health_example_cannot_do(argv, match, capsys):
    assert main(["train", "--dataset", "breast-cancer", *argv]) == 2
    assert match in capsys.readouterr().err
