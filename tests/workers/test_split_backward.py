"""A backward split in two passes (``VirtualWorker.backward(..., weights_later=True)``): the input's gradient now, the
weights' at the step. Checked against plain torch (one ``backward``, ``torch.optim.SGD``), bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splitnn.workers import BatchRef, VirtualWorker
from splitnn.workers.runner import PartyRun
from splitnn.workers.schedules import Action, Op

STEPS = 3


def _segment() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Tanh(), nn.Linear(6, 5), nn.ReLU())


def _batches() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(4)
    return [torch.randn(7, 6, generator=gen) for _ in range(STEPS)], [
        torch.randn(7, 5, generator=gen) for _ in range(STEPS)
    ]


def _plain_torch(module: nn.Module) -> tuple[list[torch.Tensor], dict]:
    """The oracle: one backward per batch, torch's own SGD."""
    xs, gs = _batches()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    grads_in = []
    for x, g in zip(xs, gs):
        opt.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_()
        module(x).backward(g)
        grads_in.append(x.grad)
        opt.step()
    return grads_in, module.state_dict()


def _worker(module: nn.Module) -> VirtualWorker:
    bob = VirtualWorker("bob", fuse=False)  # (as a networked party runs: every cut detached)
    bob.add_segment("s", module, "sgd:lr=0.1")
    return bob


def _engine(module: nn.Module, weights_later: bool) -> tuple[list[torch.Tensor], dict]:
    """Bob's part of a batch as a shipped epoch runs it: alice's activation in, claire's gradient back."""
    bob = _worker(module)
    xs, gs = _batches()
    grads_in = []
    for x, g in zip(xs, gs):
        bob.zero_grad("s")
        out = bob.forward("s", bob.put(x.clone(), src="alice", kind="activation"))
        bob._take(out.id)  # (sent to claire)
        back = bob.backward("s", bob.put(g.clone(), src="claire", kind="gradient"), weights_later=weights_later)
        grads_in.append(bob._take(back.id))
        bob.step("s")
    return grads_in, module.state_dict()


@pytest.mark.parametrize("weights_later", [False, True])
def test_a_split_backward_sends_the_same_gradient_and_steps_to_the_same_weights(weights_later):
    want_in, want_state = _plain_torch(_segment())
    got_in, got_state = _engine(_segment(), weights_later)
    assert all(torch.equal(a, b) for a, b in zip(got_in, want_in))
    assert want_state.keys() == got_state.keys()
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)


def _backward_once(module: nn.Module, *, weights_later: bool = True) -> VirtualWorker:
    bob = _worker(module)
    xs, gs = _batches()
    bob.zero_grad("s")
    out = bob.forward("s", bob.put(xs[0].clone(), src="alice", kind="activation"))
    bob._take(out.id)
    back = bob.backward("s", bob.put(gs[0].clone(), src="claire", kind="gradient"), weights_later=weights_later)
    bob._take(back.id)
    return bob


def _one_backward_grads() -> list[torch.Tensor]:
    module = _segment()
    xs, gs = _batches()
    module(xs[0].clone().requires_grad_()).backward(gs[0])
    return [p.grad for p in module.parameters()]


def test_the_weights_gradients_wait_until_something_needs_them():
    module = _segment()
    bob = _backward_once(module)
    assert all(p.grad is None for p in module.parameters())  # not computed yet: the step computes them
    grads = bob.get_grads("s")  # ... as does anything that reads them
    assert all(torch.equal(a, b) for a, b in zip(grads.values(), _one_backward_grads()))
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("read", ["grad_norms", "clip_grads", "zero_grad", "forward"])
def test_whatever_reads_or_replaces_the_gradients_computes_them_first(read):
    module = _segment()
    bob = _backward_once(module)
    want = torch.stack([torch.linalg.vector_norm(g) for g in _one_backward_grads()])
    if read == "grad_norms":
        assert torch.equal(bob.grad_norms("s"), want)
    elif read == "clip_grads":
        bob.clip_grads("s", 1e9, torch.tensor(1.0))  # (a factor of 1: the gradients as they are)
        assert torch.equal(torch.stack([torch.linalg.vector_norm(p.grad) for p in module.parameters()]), want)
    elif read == "zero_grad":
        bob.zero_grad("s")
        assert all(p.grad is None for p in module.parameters())
    else:
        bob._take(bob.forward("s", bob.put(torch.zeros(7, 6), src="alice", kind="activation")).id)
        assert torch.equal(torch.stack([torch.linalg.vector_norm(p.grad) for p in module.parameters()]), want)
    assert bob._segments["s"].weights_due is None


class _Counted(nn.Module):
    """A layer torch does not define: its backward might draw noise or count (a privacy defense's does)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _hooked() -> nn.Module:
    module = _segment()
    module[1].register_full_backward_hook(lambda *args: None)
    return module


def _deep() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))  # (its second pass would redo 8 x 5 x 7)


@pytest.mark.parametrize("make", [_Counted, _hooked, _deep], ids=["foreign-layer", "hooked", "weights-in-two-layers"])
def test_a_segment_the_split_does_not_suit_runs_one_backward(make):
    module = make()
    bob = _backward_once(module)
    assert bob._segments["s"].weights_due is None
    assert all(p.grad is not None for p in module.parameters())  # computed at once, by the one backward


class _Engine:
    """Records the backward calls a PartyRun makes."""

    name = "bob"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def backward(self, key, grad, **kwargs):
        self.calls.append((key, kwargs))
        return None


@pytest.mark.parametrize("split", [False, True])
def test_a_lock_step_party_splits_only_a_backward_whose_gradient_goes_to_another(split):
    engine = _Engine()
    run = PartyRun(engine, {0: "s0", 1: "s1"}, 2, "d", "nll", [], stashing=False, split_backward=split)
    run._grad[(1, 0)] = run._grad[(0, 0)] = object()
    run.compute(Action(1, Op.BACKWARD, 0))
    run.compute(Action(0, Op.BACKWARD, 0))  # the first stage: its input is data, nothing goes back
    assert engine.calls == [("s1", {"weights_later": True} if split else {}), ("s0", {})]


def test_a_pipelined_party_never_splits():
    engine = _Engine()
    engine.start_pipelined_run = lambda key, prediction=None: None
    engine.backward_in_flight = lambda key, t, grad: engine.calls.append((key, "in flight"))
    run = PartyRun(engine, {0: "s0", 1: "s1"}, 2, "d", "nll", [], stashing=True, split_backward=True)
    run._grad[(1, 0)] = object()
    run.compute(Action(1, Op.BACKWARD, 0))
    assert engine.calls == [("s1", "in flight")]


def test_releasing_the_intermediate_tensors_lets_the_retained_graph_go():
    module = _segment()
    bob = _backward_once(module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    bob.release()  # (a run that failed between its backward and its step)
    bob.step("s")
    assert bob._segments["s"].weights_due is None
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_the_label_holder_splits_its_backward_from_the_loss_alike():
    """Claire's part: alice's activation in, the loss on her labels, the input's gradient back to bob."""
    xs, _ = _batches()
    labels = torch.tensor([0, 4, 2, 1, 3, 4, 0])
    want_module, got_module = _segment(), _segment()
    opt = torch.optim.SGD(want_module.parameters(), lr=0.1)
    claire = _worker(got_module)
    claire.add_dataset("d", labels=labels)
    for x in xs:
        opt.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        torch.nn.functional.cross_entropy(want_module(leaf), labels).backward()
        opt.step()
        claire.zero_grad("s")
        out = claire.forward("s", claire.put(x.clone(), src="bob", kind="activation"))
        claire.loss(out, BatchRef("d", torch.arange(7)), "cross_entropy")
        back = claire.backward("s", None, weights_later=True)
        assert claire._segments["s"].weights_due is not None  # split: the weights wait for the step
        assert torch.equal(claire._take(back.id), leaf.grad)
        claire.step("s")
    assert all(torch.equal(a, b) for a, b in zip(got_module.state_dict().values(), want_module.state_dict().values()))
