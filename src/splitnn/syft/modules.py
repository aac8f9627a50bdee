"""Sending ``nn.Module``s to workers: ``model.send(alice)``, ``model.location``, ``model.get()``.

A sent module stays the same Python object with the same parameters, so
optimizers built before ``.send`` keep stepping it (as in the tutorials). What
changes is its place: two forward hooks make calling it check that every input
lives at the module's worker (else a :class:`TensorsNotCollocatedException`
naming both), run the layers on the inputs' tensors, and return the output as a
pointer at that worker. Sending, moving and fetching a module are recorded as
``weights`` bytes (its state dict: parameters and buffers).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from splitnn.errors import WorkerError
from splitnn.syft.exceptions import LOCAL, TensorsNotCollocatedException
from splitnn.syft.pointers import scan, unwrap, wrap
from splitnn.syft.worker import VirtualWorker, check_worker, record
from splitnn.wire.tensor_codec import tensor_nbytes

#: Instance attribute (in ``module.__dict__``) holding the worker a module was sent to.
LOCATION_ATTR = "_syft_location"
_HOOKED_ATTR = "_syft_hooked"


def location_of(module: nn.Module) -> VirtualWorker | None:
    """The worker ``module`` was sent to, or None when it is local."""
    return module.__dict__.get(LOCATION_ATTR)


def send_module(module: nn.Module, worker: VirtualWorker) -> nn.Module:
    """``module.send(worker)``: place the module at ``worker``; returns the module itself."""
    check_worker(worker, "send")
    here = location_of(module)
    if here is not None:
        raise WorkerError(
            f"this {type(module).__name__} is already at {here.id!r}; use .move({worker!r}) to send it "
            f"on, or .get() to bring it home first"
        )
    record(None, worker, "weights", _state_nbytes(module))
    _place(module, worker)
    return module


def move_module(module: nn.Module, worker: VirtualWorker) -> nn.Module:
    """``module.move(worker)``: send a sent module straight on to another worker."""
    check_worker(worker, "move")
    here = location_of(module)
    if here is None:
        raise WorkerError(f"this {type(module).__name__} is local; use .send({worker!r})")
    if worker != here:
        record(here, worker, "weights", _state_nbytes(module))
        _place(module, worker)
    return module


def get_module(module: nn.Module) -> nn.Module:
    """``module.get()``: bring a sent module home; returns the module itself, local again."""
    here = location_of(module)
    if here is None:
        raise WorkerError(f"this {type(module).__name__} was never sent; there is nothing to .get()")
    record(here, None, "weights", _state_nbytes(module))
    del module.__dict__[LOCATION_ATTR]
    return module


def copy_module(module: nn.Module) -> nn.Module:
    """``module.copy()``: a deep copy at the same place (nothing travels)."""
    return copy.deepcopy(module)


def _place(module: nn.Module, worker: VirtualWorker) -> None:
    module.__dict__[LOCATION_ATTR] = worker
    if not module.__dict__.get(_HOOKED_ATTR):
        module.register_forward_pre_hook(_check_inputs, with_kwargs=True)
        module.register_forward_hook(_point_output)
        module.__dict__[_HOOKED_ATTR] = True


def _check_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: every input must live at the module's worker; hand the layers the tensors."""
    here = location_of(module)
    if here is None:  # brought home with .get(): an ordinary module again
        return None
    pointers, local = scan((args, kwargs))
    for p in pointers:
        if p.location != here:
            raise TensorsNotCollocatedException.for_module(type(module).__name__, here.id, p.location.id)
    if local:
        raise TensorsNotCollocatedException.for_module(type(module).__name__, here.id, LOCAL)
    return unwrap(args), unwrap(kwargs)


def _point_output(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: the output lives at the module's worker."""
    here = location_of(module)
    return None if here is None else wrap(output, here, "activation", {})


def _state_nbytes(module: nn.Module) -> int:
    return sum(tensor_nbytes(t) for t in module.state_dict().values())
