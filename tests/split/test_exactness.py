"""A split model and its monolithic twin, trained with the same seed and data order, end bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn, optim

import splitnn
from splitnn.models import small_cnn, tutorial_mlp
from splitnn.training import epoch_batches
from tests.helpers import assert_same_weights, toy_dataset, train_twin

BUILDERS = {"mlp": lambda: tutorial_mlp(), "cnn": lambda: small_cnn()}


def _workers(fuse: bool, names=("alice", "bob", "claire")):
    return [splitnn.VirtualWorker(n, fuse=fuse) for n in names]


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
def test_fit_matches_monolithic_twin(arch, fuse):
    torch.manual_seed(0)
    segments = BUILDERS[arch]()
    initial = copy.deepcopy(segments)
    data = toy_dataset(200)
    model = splitnn.SplitNN(segments, _workers(fuse), optimizer=lambda p: optim.SGD(p, lr=0.03))
    model.fit(data, epochs=2, batch_size=32, seed=7, progress=False)
    twin = train_twin(initial, data, epochs=2, batch_size=32, seed=7)
    assert_same_weights(model.collect(), twin)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
def test_low_level_loop_matches_monolithic_twin(arch, fuse):
    """The tutorial's loop: zero_grads, forward, loss.backward, backward, step."""
    torch.manual_seed(1)
    segments = BUILDERS[arch]()
    twin = nn.Sequential(*copy.deepcopy(segments))
    data = toy_dataset(96, seed=3)
    model = splitnn.SplitNN(segments, _workers(fuse), optimizer=lambda p: optim.SGD(p, lr=0.03))
    twin_opt = optim.SGD(twin.parameters(), lr=0.03)
    for idx in epoch_batches(len(data), 16, seed=1):
        x, y = data.features[idx], data.labels[idx]
        model.zero_grads()
        loss = nn.NLLLoss()(model.forward(x), y)
        loss.backward()
        model.backward()
        model.step()
        twin_opt.zero_grad()
        nn.NLLLoss()(twin(x), y).backward()
        twin_opt.step()
    assert_same_weights(model.collect(), twin)


def test_consecutive_segments_on_one_worker_match_twin():
    torch.manual_seed(2)
    segments = tutorial_mlp()
    initial = copy.deepcopy(segments)
    alice, bob = splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")
    data = toy_dataset(128, seed=4)
    model = splitnn.SplitNN(segments, [alice, bob, bob])
    model.fit(data, epochs=1, batch_size=64, progress=False)
    assert_same_weights(model.collect(), train_twin(initial, data, epochs=1, batch_size=64))
    assert model.ledger.total(src="bob", dst="bob") == 0
    assert model.ledger.parties() == ["alice", "bob", "researcher"]


def test_optimizer_spec_string_equals_factory():
    torch.manual_seed(3)
    segs_a = tutorial_mlp()
    segs_b = copy.deepcopy(segs_a)
    data = toy_dataset(64)
    a = splitnn.SplitNN(segs_a, _workers(True), optimizer="sgd:lr=0.05")
    b = splitnn.SplitNN(segs_b, _workers(True), optimizer=lambda p: optim.SGD(p, lr=0.05))
    for m in (a, b):
        m.fit(data, epochs=1, batch_size=16, progress=False)
    assert_same_weights(a.collect(), b.collect())


def test_training_changes_weights_and_lowers_loss():
    torch.manual_seed(4)
    data = toy_dataset(256, classes=2)
    data.labels.copy_((data.features.flatten(1)[:, 0] > 0).long())  # a learnable rule
    before = nn.Sequential(*copy.deepcopy(tutorial_mlp(classes=2)))
    model = splitnn.SplitNN(copy.deepcopy(list(before)), _workers(True), optimizer="sgd:lr=0.1")
    history = model.fit(data, epochs=8, batch_size=32, progress=False)
    losses = history.losses()
    assert losses[-1] < losses[0] * 0.8
    assert not torch.equal(model.collect()[1].weight, before[0][1].weight)


def test_fit_can_continue_where_an_earlier_fit_stopped():
    """Two fits of one epoch each (the second with initial_epoch=1) equal one fit of two epochs."""
    torch.manual_seed(5)
    segs_a = tutorial_mlp()
    segs_b = copy.deepcopy(segs_a)
    data = toy_dataset(96, seed=5)
    once = splitnn.SplitNN(segs_a, _workers(True))
    once.fit(data, epochs=2, batch_size=32, progress=False)
    twice = splitnn.SplitNN(segs_b, _workers(True))
    twice.fit(data, epochs=1, batch_size=32, progress=False)
    history = twice.fit(data, epochs=1, batch_size=32, initial_epoch=1, progress=False)
    assert [e.epoch for e in history.epochs] == [2]
    assert_same_weights(once.collect(), twice.collect())
