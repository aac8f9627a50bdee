from __future__ import annotations

import pytest
import torch
from torch import nn

import splitnn
from splitnn.errors import PolicyError, WorkerError
from splitnn.workers import BatchRef, VirtualWorker, Worker


def test_virtual_worker_satisfies_the_protocol():
    assert isinstance(VirtualWorker("alice"), Worker)


def test_raw_features_and_labels_are_never_handed_out():
    alice = VirtualWorker("alice")
    ref = alice.put(torch.ones(2, 3), src="researcher", kind="features")
    with pytest.raises(PolicyError, match="alice.*features"):
        alice.fetch(ref)
    with pytest.raises(PolicyError):
        alice._take(ref.id)


def test_policy_can_refuse_outputs():
    alice = VirtualWorker("alice", policy=splitnn.WorkerPolicy(release_outputs=False))
    alice.add_segment("s", nn.Linear(3, 2), "sgd")
    alice.add_dataset("d", features=torch.ones(4, 3))
    out = alice.forward("s", BatchRef("d", torch.arange(2)))
    with pytest.raises(PolicyError):
        alice.fetch(out)


def test_consumed_refs_cannot_be_read_twice():
    alice = VirtualWorker("alice")
    ref = alice.put(torch.ones(2), src="researcher", kind="activation")
    alice.fetch(ref)
    with pytest.raises(WorkerError, match="holds no tensor"):
        alice.fetch(ref)


def test_unknown_segment_is_named():
    with pytest.raises(WorkerError, match="worker 'bob' hosts no segment 'x'"):
        VirtualWorker("bob").step("x")


def test_reserved_or_empty_names_are_refused():
    for bad in ("", "researcher", 3):
        with pytest.raises(splitnn.ConfigurationError):
            VirtualWorker(bad)


def test_dataset_stats_reveal_shape_not_contents():
    w = VirtualWorker("claire")
    w.add_dataset("d", labels=torch.tensor([1, 0, 4]))
    stats = w.dataset_stats("d")
    assert (stats.size, stats.num_labels, stats.label_max, stats.feature_shape) == (3, 3, 4, None)
