"""The in-process engine's public surface for servers, and the argument checks every worker shares."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import splitnn
from splitnn.client.remote import RemoteWorker
from splitnn.errors import ConfigurationError, PolicyError, WorkerError
from splitnn.workers import BatchRef, VirtualWorker


def test_engine_surface_a_server_uses():
    w = VirtualWorker("bob", fuse=False)
    w.add_segment("k", nn.Linear(3, 2), "sgd")
    w.add_dataset("d", features=torch.ones(4, 3))
    assert w.segment_keys() == ["k"] and w.has_segment("k") and not w.has_segment("x")
    assert isinstance(w.segment("k"), nn.Linear)
    with pytest.raises(WorkerError, match="hosts no segment 'x'"):
        w.segment("x")
    assert w.dataset("d").size == 4 and list(w.datasets()) == ["d"]
    with pytest.raises(TypeError):
        w.datasets()["e"] = w.dataset("d")  # a read-only view
    with pytest.raises(WorkerError, match="holds no dataset 'e'"):
        w.dataset("e")

    other = VirtualWorker("bob")
    other.hold(w.datasets())  # shared, not copied
    assert other.dataset("d") is w.dataset("d")

    assert not w.holds_tensors()
    ref = w.keep(torch.arange(3, dtype=torch.uint8), "weights")
    assert w.holds_tensors() and w.stored_kind(ref.id) == "weights" and w.stored_kind(10**9) is None
    assert torch.equal(w.take(ref.id), torch.arange(3, dtype=torch.uint8))
    with pytest.raises(WorkerError, match="already consumed"):
        w.take(ref.id)
    feats = w.put(torch.ones(1, 3), src="researcher", kind="features")
    with pytest.raises(PolicyError):
        w.take(feats.id)  # raw features never leave

    w.forward("k", BatchRef("d", torch.arange(2)))
    w.clear()
    assert not w.segment_keys() and not list(w.datasets()) and not w.holds_tensors()


def test_workers_refuse_the_same_mistakes_in_the_same_words():
    bob = VirtualWorker("bob")
    bob.add_segment("k", nn.Linear(1, 1), "sgd")
    remote = RemoteWorker.__new__(RemoteWorker)  # the argument checks run before anything is sent
    remote.name, remote._input_is_data, remote._lock = "bob", {}, threading.RLock()
    for worker in (bob, remote):
        with pytest.raises(ConfigurationError, match="segment 'k' for worker 'bob' must be an nn.Module, got int"):
            worker.add_segment("k", 3, "sgd")
        with pytest.raises(ConfigurationError, match="dataset 'd' for worker 'bob': give features, labels or both"):
            worker.add_dataset("d")
        with pytest.raises(WorkerError, match="worker 'bob': backward on segment 'k' without a training forward"):
            worker.backward("k", None)
        with pytest.raises(WorkerError, match="forward_merged on segment 'k' needs at least one source"):
            worker.forward_merged("k", [], "concat")
        with pytest.raises(ConfigurationError, match="worker 'bob': average_states needs at least one source"):
            worker.average_states([], [], into=["k"])
        with pytest.raises(ConfigurationError, match="worker 'bob': average_states needs one weight per source"):
            worker.average_states(["k", "k"], [1.0], into=["k"])
        for weight in (0, -1.0, float("nan"), float("inf"), True, "2"):
            with pytest.raises(ConfigurationError, match="averaging weight of segment 'k' must be a finite number > 0"):
                worker.average_states(["k"], [weight], into=["k"])


class _Networked(VirtualWorker):
    """A label holder that, like a networked one, does not run in the researcher's process."""

    runs_callables = False


def test_the_low_level_loop_says_what_to_do_with_a_networked_label_holder():
    alice, bob = VirtualWorker("alice"), _Networked("bob")
    model = splitnn.SplitNN([nn.Linear(3, 4), nn.Linear(4, 2)], [alice, bob])
    with pytest.raises(ConfigurationError, match=r"model\.fit.*--allow-outputs"):
        model.forward(torch.ones(2, 3))
    assert not alice.holds_tensors()  # refused before anything ran
    assert model.eval().forward(torch.ones(2, 3)).shape == (2, 2)  # outputs without training: allowed


def test_a_worker_that_keeps_its_outputs_says_how_to_release_them():
    alice = VirtualWorker("alice", policy=splitnn.WorkerPolicy(release_outputs=False))
    alice.add_segment("s", nn.Linear(3, 2), "sgd")
    alice.add_dataset("d", features=torch.ones(4, 3))
    out = alice.forward("s", BatchRef("d", torch.arange(2)))
    with pytest.raises(PolicyError, match=r"refuses to hand out activation.*fit.*--allow-outputs"):
        alice.fetch(out)
