"""Any task across `splitnn worker` processes: parties build map-style datasets from trusted code
(``--data NAME=MODULE:FUNCTION --trust MODULE``), train a binary task with ``bce_with_logits`` and
evaluate AUC at the label holder -- bit-identical to the in-process run, metrics equal."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import splitnn
from splitnn.accounting import RESEARCHER
from splitnn.errors import ConfigurationError
from tests.helpers import assert_same_weights
from tests.transport.cluster import Cluster
from tests.workers.task_data import binary

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
MODULE = "tests.workers.task_data"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the workers import the trusted module from this checkout
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        with Cluster(tmp_path_factory.mktemp("tasks")) as cl:
            trust = ("--trust", "tests.workers")
            cl.start(
                "alice", "--data", f"train={MODULE}:train_features", "--data", f"test={MODULE}:test_features", *trust
            )
            cl.start("bob", "--data", f"train={MODULE}:train_labels", "--data", f"test={MODULE}:test_labels", *trust)
            yield cl
            assert all(w.alive() for w in cl.workers.values()), "a worker died during the tests"


@pytest.fixture()
def remote(cluster):
    workers = cluster.connect("alice", "bob")
    yield workers
    for w in workers:
        w.close()


def _segments():
    torch.manual_seed(7)
    return [nn.Sequential(nn.Linear(10, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))]


@pytest.mark.parametrize("ship", [True, False], ids=["shipped-epochs", "per-op"])
def test_binary_task_with_auc_matches_in_process(remote, ship):
    segments = _segments()
    initial = copy.deepcopy(segments)
    opt = "adam:lr=0.01"
    model = splitnn.SplitNN(segments, remote, loss="bce_with_logits", optimizer=opt, ship_epochs=ship)
    metrics = ["accuracy", "auc"]
    history = model.fit("train", epochs=2, batch_size=32, test_data="test", metrics=metrics, seed=1, progress=False)
    result = model.evaluate("test", metrics=metrics, batch_size=50)

    twin = splitnn.SplitNN(
        initial, [splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")], loss="bce_with_logits", optimizer=opt
    )
    train, test = binary(200, seed=11), binary(120, seed=12)
    twin_history = twin.fit(train, epochs=2, batch_size=32, test_data=test, metrics=metrics, seed=1, progress=False)
    expected = twin.evaluate(test, metrics=metrics, batch_size=50)

    assert history.losses() == twin_history.losses()
    assert [e.test_metrics for e in history.epochs] == [e.test_metrics for e in twin_history.epochs]
    assert result.metrics == expected.metrics and result.loss == expected.loss
    assert_same_weights(model.collect(), twin.collect())
    assert result.metrics["auc"] > 0.8
    # only metric values came back: no output, label or activation byte reached the researcher
    for kind in ("output", "labels", "activation", "features"):
        assert model.ledger.total(dst=RESEARCHER, kind=kind) == 0


def test_labels_are_checked_against_the_loss_from_the_remote_summary(remote):
    model = splitnn.SplitNN(_segments(), remote, loss="nll")
    with pytest.raises(splitnn.LabelError, match=r"float32 labels but loss 'nll' needs integer class labels"):
        model.fit("train", epochs=1, progress=False)
    assert model.ledger.total(kind="activation") == 0


def test_a_callable_loss_or_map_style_data_cannot_cross_the_wire(remote):
    with pytest.raises(ConfigurationError, match="takes losses by name only"):
        splitnn.SplitNN(_segments(), remote, loss=lambda out, y: F.mse_loss(out, y.view(-1, 1)))
    with pytest.raises(ConfigurationError, match="--data x=MODULE:FUNCTION --trust MODULE"):
        remote[0].add_dataset("x", features=binary(10, seed=0).features.tolist())
