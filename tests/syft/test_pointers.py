"""Pointers and sent modules: what each call does, what it records, and the errors for mixed places."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn, optim

import splitnn.syft as sy
from splitnn.errors import WorkerError
from splitnn.syft import PointerTensor, TensorsNotCollocatedException, UnsupportedFeatureError
from tests.syft.helpers import link_table


@pytest.fixture
def places():
    hook = sy.TorchHook(torch)
    return tuple(sy.VirtualWorker(hook, id=name) for name in ("alice", "bob", "claire"))


def _both_named(exc: pytest.ExceptionInfo, first: str, second: str) -> None:
    message = str(exc.value)
    assert f"'{first}'" in message and (f"'{second}'" in message if second != "local" else "researcher" in message)
    assert {exc.value.first, exc.value.second} == {first, second}
    assert isinstance(exc.value, WorkerError)


# -- transfers and what they record -----------------------------------------------------------


def test_send_records_floats_as_features_and_integers_as_labels(places):
    alice, bob, _ = places
    x = torch.randn(8, 784).send(alice)
    y = torch.arange(8).send(bob)
    assert isinstance(x, PointerTensor) and x.location == alice and y.location == bob
    assert x.shape == (8, 784) and len(y) == 8
    assert link_table(sy.ledger()) == {
        ("researcher", "alice", "features"): (1, 8 * 784 * 4),
        ("researcher", "bob", "labels"): (1, 8 * 8),
    }


def test_move_records_activations_and_gradients_by_what_they_are(places):
    alice, bob, _ = places
    a = nn.Linear(5, 3).send(alice)(torch.randn(4, 5).send(alice))  # a segment's output at alice
    assert a.kind == "activation" and (torch.randn(2).send(alice) * 2).kind == "features"
    remote = a.detach().move(bob).requires_grad_()
    (remote * remote).sum().backward()
    grad = remote.grad.copy().move(alice)
    assert grad.kind == "gradient" and grad.location == alice
    features = torch.randn(2, 5).send(alice).move(bob)
    links = link_table(sy.ledger())
    assert links[("alice", "bob", "activation")] == (1, 4 * 3 * 4)
    assert links[("bob", "alice", "gradient")] == (1, 4 * 3 * 4)
    assert links[("alice", "bob", "features")] == (1, 2 * 5 * 4)  # raw data moved on stays raw data
    assert ("bob", "alice", "activation") not in links
    assert features.kind == "features"


def test_move_to_the_same_worker_is_free_and_returns_the_pointer(places):
    alice = places[0]
    x = torch.ones(3).send(alice)
    before = sy.ledger().snapshot()
    assert x.move(alice) is x
    assert sy.ledger().since(before).total() == 0


def test_get_brings_values_home_recorded_and_spends_the_pointer(places):
    alice, bob, _ = places
    w = nn.Linear(3, 1).send(bob)
    loss = w(torch.randn(5, 3).send(bob)).sum()
    value = loss.get()
    assert type(value) is torch.Tensor and value.grad_fn is None  # no graph travels...
    assert value.is_leaf and value.requires_grad  # ...but, as in PySyft 0.2, the requires_grad flag does
    assert link_table(sy.ledger())[("bob", "researcher", "output")] == (1, 4)
    with pytest.raises(WorkerError, match=r"spent: the tensor was brought home with \.get\(\)"):
        loss.backward()
    labels = torch.tensor([1, 2]).send(alice)
    assert torch.equal(labels.get(), torch.tensor([1, 2]))
    assert link_table(sy.ledger())[("alice", "researcher", "labels")] == (1, 16)
    leaf = torch.ones(2, requires_grad=True).send(alice).get()
    assert leaf.is_leaf and leaf.requires_grad  # a leaf's flag travels


def test_moved_pointer_follows_the_tensor(places):
    """PySyft 0.2's PointerTensor.move sets ``ptr.location = destination``: the sender's pointer follows."""
    alice, bob, claire = places
    x = torch.ones(2).send(alice)
    y = x.move(bob)
    assert y is x and x.location == bob
    assert (x.view(-1) * 2).location == bob
    assert x.move_(claire) is x and x.location == claire  # PySyft's in-place spelling
    assert torch.equal(y.get(), torch.ones(2))
    assert link_table(sy.ledger(), ("features",)) == {
        ("researcher", "alice", "features"): (1, 8),
        ("alice", "bob", "features"): (1, 8),
        ("bob", "claire", "features"): (1, 8),
        ("claire", "researcher", "features"): (1, 8),
    }


def test_copy_is_an_independent_tensor_at_the_same_worker(places):
    alice = places[0]
    x = torch.zeros(3).send(alice)
    y = x.copy()
    y.add_(1)
    assert y.location == alice and torch.equal(x.get(), torch.zeros(3)) and torch.equal(y.get(), torch.ones(3))


def test_values_cannot_be_read_without_a_recorded_get(places):
    x = torch.ones(1).send(places[0])
    for read in (lambda: x.item(), lambda: x.tolist(), lambda: x.numpy()):
        with pytest.raises(WorkerError, match="call .get"):
            read()
    assert "1." not in repr(x)  # the repr shows place, kind, shape, dtype; not values
    with pytest.raises(UnsupportedFeatureError, match="pointer chain.*already at 'alice': use .move"):
        x.send(places[1])


def test_operations_at_one_worker_give_pointers_there(places):
    alice = places[0]
    x = torch.tensor([[1.0, 5.0], [7.0, 2.0]]).send(alice)
    values, indices = x.max(1)
    results = [x + 1, 1 - x, x * x, x @ x, -x, x[0], x.view(-1), torch.relu(x), values, indices, x == 1, x.T]
    assert all(isinstance(r, PointerTensor) and r.location == alice for r in results)
    assert x.requires_grad_() is x and x.requires_grad  # in-place: the same pointer
    assert torch.equal(indices.get(), torch.tensor([1, 0]))


# -- modules --------------------------------------------------------------------------------


def test_sent_module_runs_at_its_worker_and_its_optimizer_still_steps_it(places):
    alice = places[0]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2), nn.LogSoftmax(dim=1))
    twin = copy.deepcopy(model)
    opt, twin_opt = optim.SGD(model.parameters(), lr=0.1), optim.SGD(twin.parameters(), lr=0.1)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 1, 0, 1, 0])
    assert model.send(alice) is model and model.location == alice
    assert link_table(sy.ledger()) == {("researcher", "alice", "weights"): (1, (4 * 2 + 2) * 4)}
    for _ in range(3):
        opt.zero_grad()
        loss = nn.NLLLoss()(model(x.send(alice)), y.send(alice))
        assert isinstance(loss, PointerTensor) and loss.location == alice
        loss.backward()
        opt.step()
        twin_opt.zero_grad()
        nn.NLLLoss()(twin(x), y).backward()
        twin_opt.step()
    assert model.get() is model and model.location is None
    assert link_table(sy.ledger())[("alice", "researcher", "weights")] == (1, 40)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert isinstance(model(x), torch.Tensor)  # home: an ordinary module again


def test_module_move_copy_and_buffers_count_as_weights(places):
    alice, bob, _ = places
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).send(alice)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    twin = model.copy()
    assert twin is not model and twin.location == alice
    assert model.move(bob) is model and model.location == bob and twin.location == alice
    assert link_table(sy.ledger()) == {
        ("researcher", "alice", "weights"): (1, nbytes),
        ("alice", "bob", "weights"): (1, nbytes),
    }
    with pytest.raises(WorkerError, match="already at 'bob'"):
        model.send(alice)


# -- mixing places: a clear error naming both ----------------------------------------------------


def test_module_at_alice_applied_to_a_tensor_at_bob(places):
    alice, bob, _ = places
    model = nn.Linear(3, 2).send(alice)
    with pytest.raises(TensorsNotCollocatedException) as exc:
        model(torch.randn(1, 3).send(bob))
    _both_named(exc, "alice", "bob")
    assert "Linear" in str(exc.value)


def test_loss_on_tensors_at_two_workers(places):
    _, bob, claire = places
    pred = torch.log_softmax(torch.randn(4, 3), dim=1).send(claire)
    with pytest.raises(TensorsNotCollocatedException) as exc:
        nn.NLLLoss()(pred, torch.tensor([0, 1, 2, 0]).send(bob))
    _both_named(exc, "claire", "bob")
    assert "nll_loss" in str(exc.value)


def test_arithmetic_and_backward_across_workers(places):
    alice, bob, _ = places
    a = torch.ones(2, requires_grad=True).send(alice) * 3
    with pytest.raises(TensorsNotCollocatedException) as exc:
        a + torch.ones(2).send(bob)
    _both_named(exc, "alice", "bob")
    with pytest.raises(TensorsNotCollocatedException) as exc:
        a.backward(torch.ones(2).send(bob))
    _both_named(exc, "alice", "bob")


def test_local_and_remote_do_not_mix(places):
    alice = places[0]
    x = torch.randn(1, 3).send(alice)
    with pytest.raises(TensorsNotCollocatedException) as exc:
        nn.Linear(3, 2)(x)  # a module that was never sent
    _both_named(exc, "alice", "local")
    with pytest.raises(TensorsNotCollocatedException) as exc:
        nn.Linear(3, 2).send(alice)(torch.randn(1, 3))  # a tensor that was never sent
    _both_named(exc, "alice", "local")
    with pytest.raises(TensorsNotCollocatedException) as exc:
        torch.ones(1, 3) + x
    _both_named(exc, "alice", "local")


def test_a_sent_leaf_has_its_own_gradient_at_the_worker(places):
    x = torch.ones(2, requires_grad=True)
    remote = x.send(places[0])
    (remote * 3).sum().backward()
    assert x.grad is None  # nothing flowed back to the researcher's tensor
    assert torch.equal(remote.grad.get(), torch.full((2,), 3.0))
    assert link_table(sy.ledger())[("alice", "researcher", "gradient")] == (1, 8)
