"""``splitnn worker --data``: datasets built from trusted code or read from a CSV table, checked before serving."""

from __future__ import annotations

import pytest
import torch

from splitnn.cli.main import main
from splitnn.cli.worker import is_trusted, load_data_spec
from splitnn.errors import ConfigurationError
from splitnn.workers.held import HeldData


def test_trust_is_by_module_prefix_not_by_substring():
    assert is_trusted("tests.workers.task_data", ["tests.workers"])
    assert is_trusted("tests.workers", ["tests.workers"])
    assert not is_trusted("tests.workers_evil", ["tests.workers"])
    assert not is_trusted("os", [])


def test_a_trusted_function_builds_the_partys_dataset():
    name, held = load_data_spec("train=tests.workers.task_data:train_features", ["tests.workers"])
    assert name == "train" and set(held) == {"features"}
    assert not isinstance(held["features"], torch.Tensor)  # a map-style dataset, held as it is
    assert HeldData.hold(name, "alice", **held).stats(name).feature_shape == (10,)
    _, labels = load_data_spec("train=tests.workers.task_data:train_labels,parts=labels", ["tests"])
    assert labels["labels"].dtype == torch.float32


@pytest.mark.parametrize(
    "spec, trust, match",
    [
        ("d=tests.workers.task_data:train_features", [], r"module 'tests.workers.task_data' is not trusted.*--trust"),
        ("d=tests.workers.task_data:nope", ["tests"], "cannot load tests.workers.task_data:nope"),
        ("d=tests.workers.task_data:train_labels,parts=features", ["tests"], "gave no features"),
        ("d=tests.workers.task_data:binary", ["tests"], r"binary\(\) failed"),
        ("d=tests.workers.task_data:train_features,limit=3", ["tests"], "unknown option 'limit=3'"),
        ("d=table:/nonexistent.csv", [], "id=COLUMN"),
        ("d=table:/x.csv,id=pid,rows=3", [], "unknown option 'rows=3'"),
    ],
)
def test_bad_specs_are_refused_naming_the_fix(spec, trust, match):
    with pytest.raises(ConfigurationError, match=match):
        load_data_spec(spec, trust)


def test_a_table_spec_holds_features_labels_and_ids(tmp_path):
    path = tmp_path / "lab.csv"
    path.write_text("pid,a,b,y\nP1,1,2,0\nP2,3,5,1\n")
    name, held = load_data_spec(f"cohort=table:{path},id=pid,columns=b+a,label=y")
    assert name == "cohort" and held["ids"] == ["P1", "P2"]
    assert held["features"].shape == (2, 2) and held["labels"].tolist() == [0.0, 1.0]


def test_the_worker_stops_before_serving_on_untrusted_code(tmp_path, capsys):
    token = tmp_path / "TOKEN"
    token.write_text("x" * 32 + "\n")
    code = main(
        ["worker", "--name", "alice", "--token-file", str(token), "--data", "d=tests.workers.task_data:train_features"]
    )
    assert code == 2
    assert "--trust tests.workers.task_data" in capsys.readouterr().err
