"""The hook is opt-in: importing splitnn changes nothing in torch; TorchHook adds only what it documents."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn, optim

import splitnn
import splitnn.syft as sy
from splitnn.errors import ConfigurationError

ADDED = {torch.Tensor: {"send", "location"}, nn.Module: {"send", "move", "get", "copy", "location"}}


def test_importing_splitnn_changes_nothing_in_torch():
    """In a fresh interpreter: torch's classes and global hooks are the same before and after the imports."""
    code = textwrap.dedent("""
        import torch
        from torch import nn
        import torch.nn.modules.module as module_mod

        def snapshot():
            classes = {c.__name__: dict(vars(c)) for c in (torch.Tensor, torch._C.TensorBase, nn.Module, nn.Parameter)}
            hooks = {k: dict(v) for k, v in vars(module_mod).items()
                     if k.startswith("_global_") and isinstance(v, dict)}
            return classes, hooks, torch._C._len_torch_function_stack()

        before = snapshot()
        import splitnn
        import splitnn.syft
        import splitnn.syft as sy
        after = snapshot()
        assert before == after, "importing splitnn changed torch"
        assert not hasattr(torch.Tensor, "send") and not hasattr(nn.Module, "send")
        assert not sy.is_hooked()
        print("unchanged")
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "unchanged"


def test_hook_adds_exactly_the_documented_attributes_and_unhook_removes_them():
    before = {cls: set(vars(cls)) for cls in ADDED}
    assert not sy.is_hooked()
    sy.TorchHook(torch)
    assert sy.is_hooked()
    for cls, names in ADDED.items():
        assert set(vars(cls)) - before[cls] == names
    assert torch.zeros(2).location is None and nn.Linear(2, 2).location is None
    sy.TorchHook(torch)  # a second hook is fine (notebooks re-run cells)
    sy.unhook()
    assert {cls: set(vars(cls)) for cls in ADDED} == before
    assert not hasattr(torch.zeros(1), "send")


def test_a_module_that_defines_location_keeps_it():
    sy.TorchHook(torch)

    class Placed(nn.Module):
        def __init__(self):
            super().__init__()
            self.location = "the lab"

    class WithProperty(nn.Module):
        location = property(lambda self: "a property")

    assert Placed().location == "the lab"
    assert WithProperty().location == "a property"


def test_hook_arguments_are_checked():
    with pytest.raises(ConfigurationError, match="torch module"):
        sy.TorchHook(nn)
    hook = sy.TorchHook(torch)
    with pytest.raises(ConfigurationError, match="hook as first argument"):
        sy.VirtualWorker("alice", id="alice")
    with pytest.raises(ConfigurationError, match="non-empty string"):
        sy.VirtualWorker(hook, id="researcher")
    with pytest.raises(ConfigurationError, match="sy.VirtualWorker"):
        torch.zeros(2).send("alice")
    with pytest.raises(ConfigurationError, match="sy.VirtualWorker"):
        nn.Linear(2, 2).send(splitnn.VirtualWorker("alice"))


def test_ledger_needs_a_hook_and_each_hook_starts_a_fresh_one():
    with pytest.raises(ConfigurationError, match="TorchHook"):
        sy.ledger()
    hook = sy.TorchHook(torch)
    alice = sy.VirtualWorker(hook, id="alice")
    torch.zeros(3).send(alice)
    assert sy.ledger() is hook.ledger is alice.ledger
    assert sy.ledger().total() == 12
    sy.TorchHook(torch)
    assert sy.ledger().total() == 0


def test_workers_are_places_equal_by_id():
    hook = sy.TorchHook(torch)
    alice, again, bob = (sy.VirtualWorker(hook, id=name) for name in ("alice", "alice", "bob"))
    assert alice == again and alice != bob and len({alice, again, bob}) == 2
    assert repr(alice) == "<VirtualWorker id:alice>"


def test_facade_workers_are_splitnn_parties_on_the_same_ledger():
    """sy workers wrap splitnn.VirtualWorkers: splitnn's own API trains on them and records in the same ledger."""
    hook = sy.TorchHook(torch)
    alice, bob = sy.VirtualWorker(hook, id="alice"), sy.VirtualWorker(hook, id="bob")
    assert isinstance(alice.worker, splitnn.VirtualWorker) and alice.worker.name == "alice"
    torch.manual_seed(0)
    segments = [nn.Sequential(nn.Linear(4, 3), nn.ReLU()), nn.Sequential(nn.Linear(3, 2), nn.LogSoftmax(dim=1))]
    model = splitnn.SplitNN(segments, [alice.worker, bob.worker], optimizer=lambda p: optim.SGD(p, lr=0.1))
    model.zero_grads()
    nn.NLLLoss()(model.forward(torch.randn(5, 4)), torch.tensor([0, 1, 0, 1, 1])).backward()
    model.backward()
    model.step()
    assert model.ledger is sy.ledger()
    assert sy.ledger().total(src="alice", dst="bob", kind="activation") == 5 * 3 * 4
