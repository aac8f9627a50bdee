"""Pipelined shipped epochs on `splitnn worker` processes: each party runs its part of the pipelined schedule,
pushing activations and gradients ahead, and the run ends torch.equal to the in-process pipelined run
(the oracle, itself checked against delayed SGD in tests/split/test_pipelined.py), with the same ledger."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import splitnn
from splitnn.accounting import RESEARCHER
from splitnn.errors import ConfigurationError
from splitnn.models import tutorial_mlp
from splitnn.training.topologies import UShapedSplitNN
from tests.helpers import assert_same_weights, toy_dataset
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

NAMES = ("alice", "bob", "claire")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("pipelined")) as cl:
        for name in NAMES:
            cl.start(name)
        yield cl
        assert all(w.alive() for w in cl.workers.values()), "a worker died during the tests"


@pytest.mark.parametrize("k, prediction", [(3, None), (16, None), (4, 0.5)])
def test_networked_pipelined_run_equals_in_process_run(remote, k, prediction):
    """... with weight prediction too (K = 4): each worker extrapolates its own segments' weights."""
    torch.manual_seed(0)
    segments = tutorial_mlp()
    initial = copy.deepcopy(segments)
    data = toy_dataset(200)
    model = splitnn.SplitNN(segments, remote, optimizer="sgd:lr=0.03", weight_prediction=prediction)
    history = model.fit(data, epochs=2, batch_size=16, pipeline=k, progress=False)

    workers = [splitnn.VirtualWorker(n) for n in NAMES]
    twin = splitnn.SplitNN(initial, workers, optimizer="sgd:lr=0.03", weight_prediction=prediction)
    twin_history = twin.fit(data, epochs=2, batch_size=16, pipeline=k, progress=False)
    assert_same_weights(model.collect(), twin.collect())
    assert history.losses() == twin_history.losses()
    assert [e.bytes_sent for e in history.epochs] == [e.bytes_sent for e in twin_history.epochs]
    assert model.ledger.links() == twin.ledger.links()
    for kind in ("activation", "gradient"):  # the researcher moves none: the parties push them to each other
        assert model.ledger.total(src=RESEARCHER, kind=kind) == model.ledger.total(dst=RESEARCHER, kind=kind) == 0


@pytest.mark.parametrize(
    "compression, prediction",
    [("int8", None), ({"activation": "topk:0.1", "gradient": "fp16"}, None), ("int8", 0.5)],
    ids=["int8", "topk-fp16", "int8-predicted"],
)
def test_networked_pipelined_compressed_run_equals_in_process_run(remote, compression, prediction):
    """K = 3 with codecs at both cuts: each worker encodes what it sends with its segment's codec (error feedback
    in batch order at the sender) and pushes the codec payloads; the receivers decode them off the wire. With
    weight prediction too, the predicted weights' activations are what is encoded."""
    torch.manual_seed(2)
    segments = tutorial_mlp()
    initial = copy.deepcopy(segments)
    data = toy_dataset(200, seed=1)
    options = dict(optimizer="sgd:lr=0.03", compression=compression, weight_prediction=prediction)
    model = splitnn.SplitNN(segments, remote, **options)
    history = model.fit(data, epochs=2, batch_size=16, pipeline=3, progress=False)

    twin = splitnn.SplitNN(initial, [splitnn.VirtualWorker(n) for n in NAMES], **options)
    twin_history = twin.fit(data, epochs=2, batch_size=16, pipeline=3, progress=False)
    assert_same_weights(model.collect(), twin.collect())
    assert history.losses() == twin_history.losses()
    assert [e.bytes_sent for e in history.epochs] == [e.bytes_sent for e in twin_history.epochs]
    assert model.ledger.links() == twin.ledger.links()  # bytes sent and raw sizes, per link
    assert 0 < model.ledger.total(kind="activation") < model.ledger.raw_total(kind="activation")


def test_networked_pipelined_u_shape_equals_in_process(cluster):
    alice, bob = (splitnn.connect(cluster.workers[n].url, token=cluster.token, name=n, timeout=60) for n in NAMES[:2])
    try:
        torch.manual_seed(1)
        parts = [
            nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU()),
            nn.Sequential(nn.Linear(32, 16), nn.ReLU()),
        ]
        parts.append(nn.Sequential(nn.Linear(16, 10), nn.LogSoftmax(dim=1)))
        initial = copy.deepcopy(parts)
        data = toy_dataset(96, seed=4)
        u = UShapedSplitNN(*parts[:1], parts[1:2], parts[2], alice, bob, optimizer="sgd:lr=0.05")
        u.fit(data, epochs=1, batch_size=8, pipeline=4, progress=False)
        twin = UShapedSplitNN(
            initial[0],
            initial[1:2],
            initial[2],
            splitnn.VirtualWorker("alice"),
            splitnn.VirtualWorker("bob"),
            optimizer="sgd:lr=0.05",
        )
        twin.fit(data, epochs=1, batch_size=8, pipeline=4, progress=False)
        assert_same_weights(u.collect(), twin.collect())
        assert u.ledger.links() == twin.ledger.links()
    finally:
        alice.close()
        bob.close()


def test_per_operation_networked_training_is_lockstep_only(remote):
    model = splitnn.SplitNN(tutorial_mlp(), remote, ship_epochs=False)
    with pytest.raises(ConfigurationError, match="ship_epochs"):
        model.fit(toy_dataset(32), epochs=1, pipeline=2, progress=False)
