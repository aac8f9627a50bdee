"""``sy.TorchHook(torch)``: the opt-in patch that gives tensors and modules ``.send``.

Importing ``splitnn`` or ``splitnn.syft`` changes nothing in torch. Creating a
hook adds these attributes, and nothing else:

- ``torch.Tensor``: ``send(worker, requires_grad=False)`` and ``location`` (None
  for a local tensor);
- ``nn.Module``: ``send(worker)``, ``move(worker)``, ``get()``, ``copy()`` and
  ``location`` (None for a local module).

:func:`unhook` takes them away again. ``location`` is a non-data descriptor, so
a class or instance that defines its own ``location`` keeps it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from splitnn.accounting import Ledger
from splitnn.errors import ConfigurationError
from splitnn.syft.modules import copy_module, get_module, location_of, move_module, send_module
from splitnn.syft.pointers import send_tensor


class _Location:
    """``obj.location``: None unless the object was sent (non-data descriptor)."""

    def __init__(self, read: Callable[[Any], Any]) -> None:
        self._read = read

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else self._read(obj)


_PATCHES: dict[type, dict[str, Any]] = {
    torch.Tensor: {"send": send_tensor, "location": _Location(lambda t: None)},
    nn.Module: {
        "send": send_module,
        "move": move_module,
        "get": get_module,
        "copy": copy_module,
        "location": _Location(location_of),
    },
}

_current: TorchHook | None = None


class TorchHook:
    """The hook of PySyft 0.2: ``hook = sy.TorchHook(torch)``.

    Patches torch (see the module docstring) and owns the ledger that the
    workers created with it record into. Each hook starts a fresh ledger;
    :func:`ledger` returns the latest hook's.

    Args:
        torch_module: the ``torch`` module (PySyft's signature).
        ledger: record into this ledger instead of a new one.
    """

    def __init__(self, torch_module: Any = torch, *, ledger: Ledger | None = None) -> None:
        global _current
        if torch_module is not torch:
            raise ConfigurationError(
                f"sy.TorchHook expects the torch module (sy.TorchHook(torch)), got {torch_module!r}"
            )
        self.torch = torch_module
        self.ledger = ledger if ledger is not None else Ledger()
        install()
        _current = self

    def __repr__(self) -> str:
        return f"<TorchHook {self.ledger!r}>"


def install() -> None:
    """Add the facade's attributes to ``torch.Tensor`` and ``nn.Module`` (idempotent)."""
    for cls, attrs in _PATCHES.items():
        for name, value in attrs.items():
            existing = cls.__dict__.get(name)
            if existing is not None and existing is not value:
                raise ConfigurationError(
                    f"cannot hook torch: {cls.__name__}.{name} already exists (another library patched torch?)"
                )
            setattr(cls, name, value)


def unhook() -> None:
    """Remove what :class:`TorchHook` added to torch (modules already sent keep their place)."""
    global _current
    for cls, attrs in _PATCHES.items():
        for name, value in attrs.items():
            if cls.__dict__.get(name) is value:
                delattr(cls, name)
    _current = None


def is_hooked() -> bool:
    """Whether torch currently carries the facade's attributes."""
    return all(cls.__dict__.get(name) is value for cls, attrs in _PATCHES.items() for name, value in attrs.items())


def ledger() -> Ledger:
    """The ledger of the latest :class:`TorchHook` (every transfer of the facade is recorded there)."""
    if _current is None:
        raise ConfigurationError("no hook yet: create one with hook = sy.TorchHook(torch)")
    return _current.ledger
