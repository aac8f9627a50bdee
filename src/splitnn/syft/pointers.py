"""``PointerTensor``: a tensor that lives at a worker, as PySyft 0.2's pointers.

A pointer holds the real tensor (``child``), the worker it lives at
(``location``) and what kind of thing it is for the ledger (``kind``:
``features``, ``labels``, ``activation`` or ``gradient``). Any torch operation
on pointers (``nn.NLLLoss()(pred, target)``, ``x.view(...)``, ``a + b``) runs on
the children when every tensor involved lives at the same worker and gives a
pointer at that worker; otherwise it raises
:class:`~splitnn.syft.exceptions.TensorsNotCollocatedException` naming both places.

Transfers are explicit and recorded: :meth:`PointerTensor.move` to another worker,
:meth:`PointerTensor.get` home to the researcher. As over a real wire, values and
a leaf's ``requires_grad`` flag travel, autograd graphs do not; the pointer that
was moved or fetched is spent (using it again raises a clear error).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from splitnn.errors import WorkerError
from splitnn.syft.exceptions import LOCAL, TensorsNotCollocatedException
from splitnn.syft.worker import VirtualWorker, check_worker, record, tensor_nbytes

#: Methods that would read a remote tensor's values without a recorded transfer.
_REVEALING = frozenset({"item", "tolist", "numpy"})


class PointerTensor:
    """A tensor at worker ``location``; see the module docstring."""

    __slots__ = ("_child", "location", "kind", "_spent")
    __hash__ = object.__hash__  # the comparison dunders below return pointers, not bools

    def __init__(self, child: torch.Tensor, location: VirtualWorker, kind: str) -> None:
        self._child: torch.Tensor | None = child
        self.location = location
        self.kind = kind
        self._spent = ""

    @property
    def child(self) -> torch.Tensor:
        """The tensor itself (as the worker sees it)."""
        if self._child is None:
            raise WorkerError(
                f"this pointer to a tensor at {self.location.id!r} is spent: the tensor {self._spent}; "
                f"use the pointer that call returned"
            )
        return self._child

    # -- transfers -------------------------------------------------------------------
    def send(self, worker: VirtualWorker) -> PointerTensor:
        """Refused: the tensor is already at a worker; use :meth:`move`."""
        raise WorkerError(
            f"this tensor is already at {self.location.id!r}; use .move({worker!r}) to send it on, "
            f"or .get() to bring it home first"
        )

    def move(self, worker: VirtualWorker) -> PointerTensor:
        """Send the tensor from its worker straight to ``worker`` (recorded as this pointer's kind)."""
        check_worker(worker, "move")
        if worker == self.location:
            return self
        child = self.child
        record(self.location, worker, self.kind, tensor_nbytes(child))
        self._spend(f"was moved to {worker.id!r}")
        return PointerTensor(_over_the_wire(child), worker, self.kind)

    def get(self) -> torch.Tensor:
        """Bring the tensor home to the researcher (recorded; a computed result counts as ``output``)."""
        child = self.child
        kind = "output" if self.kind == "activation" else self.kind
        record(self.location, None, kind, tensor_nbytes(child))
        self._spend("was brought home with .get()")
        return _over_the_wire(child)

    def copy(self) -> PointerTensor:
        """A copy of the tensor at the same worker (nothing travels)."""
        return PointerTensor(self.child.clone(), self.location, self.kind)

    # -- what the tutorials read -----------------------------------------------------
    @property
    def grad(self) -> PointerTensor | None:
        """The gradient of the tensor, at the same worker (kind ``gradient``), or None."""
        grad = self.child.grad
        return None if grad is None else PointerTensor(grad, self.location, "gradient")

    @property
    def shape(self) -> torch.Size:
        """The tensor's shape (metadata, not values: nothing is recorded)."""
        return self.child.shape

    def backward(self, gradient: PointerTensor | None = None, **kwargs: Any) -> None:
        """Back-propagate at the tensor's worker; ``gradient`` must be at the same worker."""
        run_at(lambda t, g, **kw: t.backward(g, **kw), (self, gradient), kwargs, "backward")

    # -- every other tensor method and operator ----------------------------------------
    @classmethod
    def __torch_function__(cls, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        return run_at(func, args, kwargs or {}, getattr(func, "__name__", str(func)))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self.child, name)
        if name in _REVEALING:
            raise WorkerError(
                f".{name}() would read the values of a tensor at {self.location.id!r} without a "
                f"recorded transfer; call .get() first"
            )
        if callable(attr):
            return lambda *args, **kwargs: run_at(_method(name), (self, *args), kwargs, name)
        return wrap(attr, self.location, self.kind, {})

    def __len__(self) -> int:
        return len(self.child)

    def __repr__(self) -> str:
        if self._child is None:
            return f"PointerTensor(at {self.location.id!r}, spent: {self._spent})"
        t = self._child
        return f"PointerTensor(at {self.location.id!r}, {self.kind}, shape={tuple(t.shape)}, dtype={t.dtype})"

    def _spend(self, how: str) -> None:
        self._child, self._spent = None, how


def _method(name: str) -> Callable:
    return lambda tensor, *args, **kwargs: getattr(tensor, name)(*args, **kwargs)


def _operator(name: str) -> Callable:
    def op(self: PointerTensor, *args: Any) -> Any:
        return run_at(getattr(torch.Tensor, name), (self, *args), {}, name)

    op.__name__ = name
    return op


for _name in (
    "__add__",
    "__radd__",
    "__sub__",
    "__rsub__",
    "__mul__",
    "__rmul__",
    "__truediv__",
    "__rtruediv__",
    "__matmul__",
    "__rmatmul__",
    "__pow__",
    "__neg__",
    "__abs__",
    "__getitem__",
    "__eq__",
    "__ne__",
    "__lt__",
    "__le__",
    "__gt__",
    "__ge__",
):
    setattr(PointerTensor, _name, _operator(_name))


# -- running an operation at one worker ----------------------------------------------------


def run_at(func: Callable, args: tuple, kwargs: dict, operation: str) -> Any:
    """Run ``func`` on the children of the pointers in ``args``/``kwargs``, at their common worker.

    Raises :class:`TensorsNotCollocatedException` when the pointers live at
    different workers or are mixed with local (never sent) tensors. The result's
    tensors come back as pointers at that worker; an in-place result is the
    pointer it was called on. Kind: the inputs' kind when they all share one,
    else ``activation``.
    """
    pointers, local = scan((args, kwargs))
    location = collocated(pointers, local, operation)
    result = func(*unwrap(args), **unwrap(kwargs))
    kinds = {p.kind for p in pointers}
    kind = kinds.pop() if len(kinds) == 1 else "activation"
    return wrap(result, location, kind, {id(p.child): p for p in pointers})


def collocated(pointers: list[PointerTensor], local: int, operation: str) -> VirtualWorker:
    """The one worker every pointer lives at; raise naming two places if there is not one."""
    if not pointers:
        raise WorkerError(
            f"{operation}: found no tensor pointer among its arguments (pointers nested in other "
            f"containers than lists, tuples and dicts are not supported)"
        )
    location = pointers[0].location
    for p in pointers[1:]:
        if p.location != location:
            raise TensorsNotCollocatedException.for_call(operation, location.id, p.location.id)
    if local:
        raise TensorsNotCollocatedException.for_call(operation, location.id, LOCAL)
    return location


def scan(tree: Any) -> tuple[list[PointerTensor], int]:
    """The pointers in a nest of tuples/lists/dicts, and how many plain tensors sit beside them."""
    pointers: list[PointerTensor] = []
    local = 0
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, PointerTensor):
            pointers.append(item)
        elif isinstance(item, torch.Tensor):
            local += 1
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
    return pointers, local


def unwrap(tree: Any) -> Any:
    """The same nest with every pointer replaced by its tensor."""
    if isinstance(tree, PointerTensor):
        return tree.child
    if isinstance(tree, (list, tuple)):
        return _rebuild(tree, [unwrap(x) for x in tree])
    if isinstance(tree, dict):
        return {k: unwrap(v) for k, v in tree.items()}
    return tree


def wrap(tree: Any, location: VirtualWorker, kind: str, inputs: dict[int, PointerTensor]) -> Any:
    """The same nest with every tensor as a pointer at ``location`` (an input's own tensor: that input)."""
    if isinstance(tree, torch.Tensor):
        same = inputs.get(id(tree))
        return same if same is not None else PointerTensor(tree, location, kind)
    if isinstance(tree, (list, tuple)):
        return _rebuild(tree, [wrap(x, location, kind, inputs) for x in tree])
    if isinstance(tree, dict):
        return {k: wrap(v, location, kind, inputs) for k, v in tree.items()}
    return tree


def _rebuild(seq: list | tuple, items: list) -> list | tuple:
    if isinstance(seq, list):
        return items
    if hasattr(seq, "_fields"):  # collections.namedtuple
        return type(seq)(*items)
    return type(seq)(items)  # tuple, torch.Size, torch.return_types.*


def send_tensor(tensor: torch.Tensor, worker: VirtualWorker) -> PointerTensor:
    """``tensor.send(worker)``: integer/bool tensors are recorded as ``labels``, others as ``features``."""
    check_worker(worker, "send")
    kind = "features" if (tensor.is_floating_point() or tensor.is_complex()) else "labels"
    record(None, worker, kind, tensor_nbytes(tensor))
    return PointerTensor(_over_the_wire(tensor), worker, kind)


def _over_the_wire(tensor: torch.Tensor) -> torch.Tensor:
    """What arrives after a transfer: the values, and ``requires_grad`` only for a leaf (no graph).

    In-process the values are not copied (as with splitnn's VirtualWorker): the
    new tensor shares storage with the sent one but has its own autograd identity.
    """
    out = tensor.detach()
    if tensor.is_leaf and tensor.requires_grad:
        out.requires_grad_()
    return out
