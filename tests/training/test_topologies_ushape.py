"""U-shaped split learning: labels and the output layer never leave the data holder."""

from __future__ import annotations

import copy

import pytest
import torch

import splitnn
from splitnn.errors import ConfigurationError, WorkerError
from splitnn.models import tutorial_mlp
from splitnn.training.topologies import UShapedSplitNN
from tests.helpers import assert_same_weights, toy_dataset, train_twin

W = splitnn.VirtualWorker


def _ushape(fuse: bool = True, segments=None):
    segments = segments if segments is not None else tutorial_mlp()
    initial = copy.deepcopy(segments)
    alice, bob = W("alice", fuse=fuse), W("bob", fuse=fuse)
    return UShapedSplitNN(segments[0], segments[1:-1], segments[-1], alice, bob), initial


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
def test_ushape_matches_the_monolithic_twin(fuse):
    torch.manual_seed(0)
    model, initial = _ushape(fuse)
    data = toy_dataset(160)
    model.fit(data, epochs=2, batch_size=32, seed=3, progress=False)
    assert_same_weights(model.collect(), train_twin(initial, data, epochs=2, batch_size=32, seed=3))


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
def test_labels_and_outputs_never_leave_the_data_holder(fuse):
    torch.manual_seed(1)
    model, _ = _ushape(fuse)  # 784 -128-> | bob: 128 -640-> | alice: 640 -> 10
    train, test = toy_dataset(100), toy_dataset(40, seed=5)
    model.fit(train, epochs=2, batch_size=32, test_data=test, progress=False)
    ledger = model.ledger
    links = {(l.src, l.dst, l.kind): l.nbytes for l in ledger.links()}
    trained, evaluated = 2 * 100, 2 * 40  # samples forwarded in training and in evaluation
    # alice sends exactly the head's 128-wide activations and the gradient of the middle's 640-wide output:
    # never a 10-wide output of the tail, never labels.
    assert links == {
        ("alice", "bob", "activation"): (trained + evaluated) * 128 * 4,
        ("alice", "bob", "gradient"): trained * 640 * 4,
        ("bob", "alice", "activation"): (trained + evaluated) * 640 * 4,
        ("bob", "alice", "gradient"): trained * 128 * 4,
    }
    assert ledger.total(kind="labels") == ledger.total(kind="output") == 0
    assert ledger.total(dst="researcher") == 0
    name, _ = model.prepare(train)
    with pytest.raises(WorkerError):
        model.middle_workers[0].dataset_stats(name)  # bob holds nothing of the data


def test_ushape_with_two_middle_parties():
    torch.manual_seed(2)
    segments = tutorial_mlp((64, 32, 16))
    initial = copy.deepcopy(segments)
    alice, bob, claire = W("alice"), W("bob"), W("claire")
    model = UShapedSplitNN(segments[0], segments[1:-1], segments[-1], alice, [bob, claire])
    data = toy_dataset(64)
    model.fit(data, epochs=1, batch_size=16, progress=False)
    assert model.parties() == ["alice", "bob", "claire"]
    assert model.ledger.total(src="claire", dst="alice", kind="activation") == 64 * 16 * 4
    assert model.ledger.total(src="alice", dst="claire") == model.ledger.total(
        src="alice", dst="claire", kind="gradient"
    )
    assert_same_weights(model.collect(), train_twin(initial, data, epochs=1, batch_size=16))


def test_bad_ushapes_are_refused():
    s = tutorial_mlp()
    alice, bob = W("alice"), W("bob")
    with pytest.raises(ConfigurationError, match="cannot host a middle segment"):
        UShapedSplitNN(s[0], s[1:-1], s[-1], alice, alice)
    with pytest.raises(ConfigurationError, match="at least one middle segment"):
        UShapedSplitNN(s[0], [], s[-1], alice, bob)
    with pytest.raises(ConfigurationError, match="one worker per segment"):
        UShapedSplitNN(s[0], s[1:-1], s[-1], alice, [bob, W("claire")])
