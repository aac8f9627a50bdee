"""Several models sharing in-process workers: keys and names never collide, nothing is replaced
silently, and interleaved steps of two models (or two threads) keep their own losses."""

from __future__ import annotations

import asyncio
import copy
import threading

import pytest
import torch
from torch import nn

import splitnn
from splitnn.data import Dataset
from splitnn.errors import ConfigurationError, PolicyError
from splitnn.split.driver import backward_chain, forward_chain
from splitnn.workers import BatchRef, VirtualWorker
from tests.helpers import assert_same_weights

NAMES = ("alice", "bob", "claire")


def _segments(seed: int, hidden: int = 8) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [
        nn.Sequential(nn.Linear(6, hidden), nn.ReLU()),
        nn.Sequential(nn.Linear(hidden, 5), nn.ReLU()),
        nn.Sequential(nn.Linear(5, 3), nn.LogSoftmax(dim=1)),
    ]


def _data(seed: int, n: int = 48, name: str = "rand") -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g), name=name, num_classes=3)


def _twin(segments: list[nn.Module], data: Dataset, *, epochs: int = 2, batch: int = 8, seed: int = 0) -> nn.Sequential:
    """The same layers trained as one module with one plain SGD optimizer, in fit's data order."""
    twin = nn.Sequential(*copy.deepcopy(segments))
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    for epoch in range(epochs):
        for idx in splitnn.training.epoch_batches(len(data), batch, seed=seed, epoch=epoch):
            opt.zero_grad()
            nn.functional.nll_loss(twin(data.features[idx]), data.labels[idx]).backward()
            opt.step()
    return twin


def test_an_existing_key_or_dataset_name_is_not_replaced_silently():
    alice = VirtualWorker("alice")
    alice.add_segment("k", nn.Linear(2, 2), "sgd")
    first = alice._segments["k"].module
    with pytest.raises(ConfigurationError, match="already hosts a segment 'k'.*replace=True"):
        alice.add_segment("k", nn.Linear(2, 2), "sgd")
    assert alice._segments["k"].module is first
    alice.add_segment("k", nn.Linear(2, 3), "sgd", replace=True)
    assert alice.probe("k", (1, 2)) == (1, 3)

    alice.add_dataset("d", features=torch.zeros(3, 2))
    with pytest.raises(ConfigurationError, match="already holds a dataset 'd'.*replace=True"):
        alice.add_dataset("d", features=torch.ones(3, 2))
    assert alice.dataset_stats("d").size == 3 and torch.equal(alice._data["d"].features, torch.zeros(3, 2))
    alice.add_dataset("d", features=torch.ones(5, 2), replace=True)
    assert alice.dataset_stats("d").size == 5


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
def test_two_models_whose_datasets_share_a_name_train_on_their_own_data(fuse):
    workers = [VirtualWorker(n, fuse=fuse) for n in NAMES]
    s1, s2 = _segments(1), _segments(2, hidden=7)
    t1, t2 = _twin(s1, _data(1)), _twin(s2, _data(2))
    m1 = splitnn.SplitNN(s1, workers, optimizer="sgd:lr=0.1")
    m2 = splitnn.SplitNN(s2, workers, optimizer="sgd:lr=0.1")
    d1, d2 = _data(1), _data(2)  # both named "rand"
    n1, _ = m1.prepare(d1)
    n2, _ = m2.prepare(d2)
    assert n1 != n2 and n1.startswith("rand#") and n2.startswith("rand#")
    assert {s.key for s in m1.stages}.isdisjoint(s.key for s in m2.stages)
    m1.fit(d1, epochs=2, batch_size=8, progress=False)
    m2.fit(d2, epochs=2, batch_size=8, progress=False)
    assert_same_weights(m1.collect(), t1)
    assert_same_weights(m2.collect(), t2)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
def test_interleaved_steps_of_two_models_keep_their_own_losses(fuse):
    """m1's loss, m2's loss, then m1's backward and m2's: each backward starts from its own model's loss."""
    workers = [VirtualWorker(n, fuse=fuse) for n in NAMES]
    s1, s2 = _segments(3), _segments(4, hidden=9)
    d1, d2 = _data(3, n=16), _data(4, n=16)
    t1, t2 = _twin(s1, d1, epochs=1, batch=16), _twin(s2, d2, epochs=1, batch=16)
    models = [splitnn.SplitNN(s, workers, optimizer="sgd:lr=0.1") for s in (s1, s2)]
    names = [m.prepare(d)[0] for m, d in zip(models, (d1, d2))]
    idx = splitnn.training.epoch_batches(16, 16, seed=0, epoch=0)[0]
    for m in models:
        for st in m.stages:
            st.worker.zero_grad(st.key)
    for m, name in zip(models, names):  # both forwards and losses first ...
        batch = BatchRef(name, idx)
        out = forward_chain(m.stages, batch, train=True)
        m.stages[-1].worker.loss(out, batch, "nll", train=True)
    for m in models:  # ... then both backwards and steps
        backward_chain(m.stages)
        for st in m.stages:
            st.worker.step(st.key)
    assert_same_weights(models[0].collect(), t1)
    assert_same_weights(models[1].collect(), t2)


def test_threads_training_different_models_on_shared_workers_match_their_twins():
    workers = [VirtualWorker(n, fuse=False) for n in NAMES]
    jobs = [(_segments(10 + i, hidden=6 + i), _data(10 + i)) for i in range(4)]
    twins = [_twin(copy.deepcopy(s), d) for s, d in jobs]
    results: dict[int, nn.Module] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            segments, data = jobs[i]
            model = splitnn.SplitNN(segments, workers, optimizer="sgd:lr=0.1")
            model.fit(data, epochs=2, batch_size=8, progress=False)
            results[i] = model.collect()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, twin in enumerate(twins):
        assert_same_weights(results[i], twin)


def test_the_session_limit_evicts_the_oldest_closed_session_and_refuses_when_all_are_open():
    from splitnn.server.peers import Peers
    from splitnn.server.sessions import Sessions, TooManySessions, UnknownSession
    from splitnn.transport import ByteCounters, Limits

    async def main() -> None:
        peers = Peers("bob", "t", tls=None, limits=Limits(), counters=ByteCounters(), timeout=5, resolve=lambda t: None)
        sessions = Sessions("bob", peers=peers, timeout=5, setup=lambda s: None, grace=60, max_sessions=2)

        def issue(owner: str = "r"):  # as a client does: a hello issues it, its stream opens it
            s = sessions.open(None, owner, issue=True)
            sessions.close(s)
            assert sessions.open(s.id, owner) is s and not s.fresh
            return s

        a, b = issue(), issue()
        with pytest.raises(UnknownSession, match="never issued"):  # an id the worker did not issue names nothing
            sessions.open("a" * 32, "r")
        with pytest.raises(PolicyError, match="resumed only by the researcher identity"):
            sessions.open(a.id, "someone else")
        a.engine.add_segment("k", nn.Linear(2, 2), None)
        a.engine.put(torch.ones(3), src="researcher", kind="features")
        with pytest.raises(TooManySessions, match="max-sessions"):
            sessions.open(None, "r", issue=True)
        sessions.close(a)  # its tensors go at once; its segment stays for the grace period
        assert sessions.get(a.id) is a and not a.engine._store and "k" in a.engine._segments
        assert sessions.open(a.id, "r") is a  # resumed
        sessions.close(a)
        sessions.close(b)  # held nothing: freed at once
        assert sessions.get(b.id) is None
        c = sessions.open(None)  # anonymous
        d = issue()  # the limit is reached: the oldest closed session (a) goes
        assert sessions.get(a.id) is None and not a.engine._segments and len(sessions) == 2
        sessions.close(c)
        assert sessions.get(c.id) is None
        sessions.close(d)

    asyncio.run(main())


def test_one_researcher_identity_cannot_take_every_session_slot():
    from splitnn.server.peers import Peers
    from splitnn.server.sessions import Sessions, TooManySessions
    from splitnn.transport import ByteCounters, Limits

    async def main() -> None:
        peers = Peers("bob", "t", tls=None, limits=Limits(), counters=ByteCounters(), timeout=5, resolve=lambda t: None)
        sessions = Sessions(
            "bob", peers=peers, timeout=5, setup=lambda s: None, grace=60, max_sessions=4, max_per_researcher=2
        )
        mallory = [sessions.open(None, "mallory", issue=True) for _ in range(2)]
        with pytest.raises(TooManySessions, match="limit per researcher"):
            sessions.open(None, "mallory", issue=True)
        carol = [sessions.open(None, "carol", issue=True) for _ in range(2)]
        with pytest.raises(TooManySessions, match="max-sessions\\)"):
            sessions.open(None, "eve", issue=True)
        sessions.close(mallory[0])  # (issued, not opened: kept a while, but evictable)
        assert sessions.open(None, "mallory", issue=True).owner == "mallory"  # evicts her own closed one
        assert sessions.get(mallory[0].id) is None and all(sessions.get(s.id) is s for s in carol)

    asyncio.run(main())
