"""``move(location, requires_grad=True)`` and ``send(worker, requires_grad=True)``: PySyft 0.2's origin backward hook.

The oracle for every gradient is the same layers as one plain PyTorch graph
(copied before they were sent): the gradient that travels back must continue
back-propagation at the sender exactly as if there were no cut.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import splitnn.syft as sy
from splitnn.syft import UnsupportedFeatureError
from tests.syft.helpers import link_table

B = 6


@pytest.fixture
def places():
    hook = sy.TorchHook(torch)
    return tuple(sy.VirtualWorker(hook, id=name) for name in ("alice", "bob", "claire"))


def _layers(n: int) -> list[nn.Module]:
    torch.manual_seed(0)
    widths = [5, 4, 3, 2][: n + 1]
    return [nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(widths, widths[1:])]


def _grads(modules) -> list[torch.Tensor]:
    return [p.grad for m in modules for p in m.parameters()]


def _plain_grads(layers: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The oracle: the same layers as one graph, one backward."""
    twin = nn.Sequential(*copy.deepcopy(layers))
    twin(x).pow(2).sum().backward()
    return _grads(twin)


def _assert_equal(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g is not None and torch.equal(g, e)


def test_moved_tensor_is_a_leaf_and_its_gradient_continues_at_the_sender(places):
    alice, bob, _ = places
    layers = _layers(2)
    x = torch.randn(B, 5)
    expected = _plain_grads(layers, x)
    bottom, top = layers[0].send(alice), layers[1].send(bob)
    a = bottom(x.send(alice))
    remote_a = a.move(bob, requires_grad=True)
    assert remote_a.location == bob and remote_a.is_leaf and remote_a.requires_grad
    top(remote_a).pow(2).sum().backward()  # at bob; the hook carries on at alice
    _assert_equal(_grads([bottom, top]), expected)
    assert remote_a.grad.location == bob  # the moved tensor keeps its own gradient too
    assert link_table(sy.ledger(), ("gradient",)) == {("bob", "alice", "gradient"): (1, B * 4 * 4)}


def test_the_gradient_hops_back_over_two_moves(places):
    alice, bob, claire = places
    layers = _layers(3)
    x = torch.randn(B, 5)
    expected = _plain_grads(layers, x)
    segments = [m.send(w) for m, w in zip(layers, (alice, bob, claire))]
    h = segments[0](x.send(alice)).move(bob, requires_grad=True)
    h = segments[1](h).move(claire, requires_grad=True)
    segments[2](h).pow(2).sum().backward()
    _assert_equal(_grads(segments), expected)
    assert link_table(sy.ledger(), ("gradient",)) == {
        ("claire", "bob", "gradient"): (1, B * 3 * 4),
        ("bob", "alice", "gradient"): (1, B * 4 * 4),
    }


def test_a_tensor_moved_twice_with_requires_grad_sends_its_gradient_along_both_hops(places):
    """Moving the same (leaf) tensor on again: the hooks chain, as PySyft's messages would."""
    alice, bob, claire = places
    layers = _layers(2)
    x = torch.randn(B, 5)
    expected = _plain_grads(layers, x)
    bottom, top = layers[0].send(alice), layers[1].send(claire)
    a = bottom(x.send(alice)).move(bob, requires_grad=True).move(claire, requires_grad=True)
    top(a).pow(2).sum().backward()
    _assert_equal(_grads([bottom, top]), expected)
    assert set(link_table(sy.ledger(), ("gradient",))) == {("claire", "bob", "gradient"), ("bob", "alice", "gradient")}


def test_without_requires_grad_nothing_comes_back(places):
    """PySyft 0.2 too: the flag travels (a leaf that requires grad arrives), the gradient stays where it is."""
    alice, bob, _ = places
    bottom = _layers(1)[0].send(alice)
    remote_a = bottom(torch.randn(B, 5).send(alice)).move(bob)
    assert remote_a.is_leaf and remote_a.requires_grad
    (remote_a * remote_a).sum().backward()
    assert remote_a.grad is not None and all(g is None for g in _grads([bottom]))
    assert link_table(sy.ledger(), ("gradient",)) == {}


def test_requires_grad_asks_nothing_of_a_tensor_that_does_not_require_grad(places):
    alice, bob, _ = places
    features = torch.randn(B, 5).send(alice).move(bob, requires_grad=True)
    assert not features.requires_grad
    bottom = _layers(1)[0].send(alice)
    with torch.no_grad():  # as in Tutorial 2's test cell: no graph, no hook
        out = bottom(torch.randn(B, 5).send(alice)).move(bob, requires_grad=True)
    assert not out.requires_grad


def test_send_with_requires_grad_brings_the_gradient_home(places):
    """The researcher keeps the bottom layers; the gradient reaching the sent activation comes back and continues."""
    alice = places[0]
    layers = _layers(2)
    x = torch.randn(B, 5)
    expected = _plain_grads(layers, x)
    bottom, top = layers[0], layers[1].send(alice)  # bottom stays local
    h = bottom(x)
    top(h.send(alice, requires_grad=True)).pow(2).sum().backward()
    _assert_equal(_grads([bottom, top]), expected)
    assert h.grad is not None  # PySyft's set_grad: the origin's .grad is the gradient that came back
    assert link_table(sy.ledger(), ("gradient",)) == {("alice", "researcher", "gradient"): (1, B * 4 * 4)}


def test_send_of_a_leaf_with_requires_grad_is_refused(places):
    """PySyft 0.2 would set the leaf's .grad and then back-propagate into it again (doubling it)."""
    leaf = torch.ones(3, requires_grad=True)
    with pytest.raises(UnsupportedFeatureError, match=r"requires_grad=True\) of a leaf") as exc:
        leaf.send(places[0], requires_grad=True)
    assert "grad.get()" in exc.value.instead
    assert sy.ledger().total() == 0  # refused before anything travelled
    assert leaf.send(places[0]).requires_grad  # without the keyword: fine
