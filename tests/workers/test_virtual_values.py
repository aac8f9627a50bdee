"""VirtualWorker with several values at a cut: what crosses back, what the ledger counts, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import splitnn
from splitnn.errors import ConfigurationError, WorkerError
from splitnn.workers import BatchRef, ValueShape
from tests.helpers import toy_dataset


class TwoOut(nn.Module):
    """Returns (a, b, index): two float activations and an int64 index."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        return self.a(x), self.b(x), (x[:, 0] > 0).long()


class UsesA(nn.Module):
    """Uses ``a`` and the index; ``b`` only without gradient (so none flows back to it)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(2, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, a, b, idx):
        return F.log_softmax(self.out(a + b.detach() + self.emb(idx)), dim=1)


def _train(fuse_a: bool, fuse_b: bool, steps: int = 3):
    torch.manual_seed(0)
    segs = [TwoOut(), UsesA()]
    initial = copy.deepcopy(segs)
    workers = [splitnn.VirtualWorker("alice", fuse=fuse_a), splitnn.VirtualWorker("bob", fuse=fuse_b)]
    model = splitnn.SplitNN(segs, workers, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    data = toy_dataset(24, shape=(6,), classes=3, seed=5)
    name, _ = model.prepare(data)
    for i in range(steps):
        model.train_batch(name, torch.arange(8 * i, 8 * i + 8))
    return model, initial, data


@pytest.mark.parametrize("fuse", [(True, True), (False, False), (True, False), (False, True)])
def test_only_values_whose_gradient_flows_cross_back(fuse):
    model, initial, data = _train(*fuse)
    # twin: the same two modules chained by hand
    twin = nn.ModuleList(initial)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for i in range(3):
        idx = torch.arange(8 * i, 8 * i + 8)
        opt.zero_grad()
        F.nll_loss(twin[1](*twin[0](data.features[idx])), data.labels[idx]).backward()
        opt.step()
    got = model.collect()
    for p, q in zip(got.state_dict().values(), nn.Sequential(*twin).state_dict().values()):
        assert torch.equal(p, q)
    assert twin[0].b.weight.grad is None  # nothing flowed to b: momentum never touched it
    a_bytes, b_bytes, idx_bytes = 8 * 4 * 4, 8 * 4 * 4, 8 * 8
    ledger = model.ledger
    assert ledger.total(src="alice", dst="bob", kind="activation") == 3 * (a_bytes + b_bytes + idx_bytes)
    assert ledger.count(src="alice", dst="bob", kind="activation") == 3
    assert ledger.total(src="bob", dst="alice", kind="gradient") == 3 * a_bytes  # b: no gradient; idx: none needed
    assert ledger.count(src="bob", dst="alice", kind="gradient") == 3


def test_no_gradient_record_when_nothing_flows_back():
    w0, w1 = splitnn.VirtualWorker("alice", fuse=False), splitnn.VirtualWorker("bob", fuse=False)
    w0.connect_peers({"bob": w1})
    w1.connect_peers({"alice": w0})
    w1.ledger = w0.ledger
    w0.add_dataset("d", features=torch.randn(4, 3))
    w1.add_dataset("d", labels=torch.tensor([0, 1, 1, 0]))

    class Pair(nn.Module):  # no parameters: nothing it sends needs a gradient
        def forward(self, x):
            return x, (x > 0).long()

    w0.add_segment("s0", Pair(), None)

    class Take(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, m):
            return F.log_softmax(self.lin(x * m), dim=1)

    w1.add_segment("s1", Take(), lambda p: torch.optim.SGD(p, lr=0.1))
    batch = BatchRef("d", torch.arange(4))
    out = w1.forward("s1", w0.forward("s0", batch))
    w1.loss(out, batch, "nll")
    grad = w1.backward("s1", None)
    assert w0.backward("s0", grad) is None
    assert w0.ledger.total(kind="activation") == 4 * 3 * 4 + 4 * 3 * 8
    assert w0.ledger.count(kind="gradient") == 0


def test_fetch_and_put_of_several_values_count_every_tensor():
    w = splitnn.VirtualWorker("alice")
    x = (torch.randn(2, 3), torch.zeros(2, dtype=torch.int64))
    ref = w.put(x, src="researcher", kind="features")
    assert w.ledger.total(src="researcher", dst="alice", kind="features") == 2 * 3 * 4 + 2 * 8
    w.add_segment("s", TwoOut(), None)
    out = w.forward("s", w.put(torch.randn(5, 6), src="researcher", kind="features"), train=False)
    got = w.fetch(out)
    assert isinstance(got, tuple) and len(got) == 3
    assert w.ledger.total(src="alice", dst="researcher", kind="output") == 5 * 4 * 4 * 2 + 5 * 8
    assert ref.owner == "alice"


def test_probe_keeps_each_value_s_dtype():
    w = splitnn.VirtualWorker("bob")
    w.add_segment("s", UsesA(), None)
    shape = w.probe("s", (ValueShape((2, 4)), ValueShape((2, 4)), ValueShape((2,), torch.int64)))
    assert shape == (2, 3)
    w.add_segment("t", TwoOut(), None)
    assert w.probe("t", (2, 6)) == (
        ValueShape((2, 4), torch.float32),
        ValueShape((2, 4), torch.float32),
        ValueShape((2,), torch.int64),
    )


def test_a_segment_must_return_tensors():
    class Bad(nn.Module):
        def forward(self, x):
            return x, x.shape[0]

    w = splitnn.VirtualWorker("alice")
    w.add_segment("s", Bad(), None)
    with pytest.raises(WorkerError, match=r"segment 's' at 'alice' returned a int as value 1.*only tensors"):
        w.probe("s", (2, 3))


def test_the_label_holder_needs_one_output_tensor():
    workers = [splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")]
    model = splitnn.SplitNN([nn.Linear(6, 6), TwoOut()], workers)
    with pytest.raises(ConfigurationError, match=r"segment 1 \(at bob\) returns 3 values: .*one output tensor"):
        model.prepare(toy_dataset(8, shape=(6,), classes=3))


def test_shape_mismatch_names_the_values_at_the_cut():
    workers = [splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")]
    model = splitnn.SplitNN([TwoOut(), nn.Linear(4, 3)], workers)  # takes one value, gets three
    with pytest.raises(ConfigurationError, match=r"segment 0 \(at alice\) outputs 3 values: \(2, 4\) float32"):
        model.prepare(toy_dataset(8, shape=(6,), classes=3))
