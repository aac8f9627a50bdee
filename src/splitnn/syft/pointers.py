"""``PointerTensor``: a tensor that lives at a worker, as PySyft 0.2's pointers.

Torch operations on pointers run where every tensor involved lives, or raise
:class:`~splitnn.syft.exceptions.TensorsNotCollocatedException` naming both places; transfers are
explicit and recorded in the ledger, with PySyft 0.2's semantics (:class:`PointerTensor`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from splitnn.errors import WorkerError
from splitnn.syft.exceptions import (
    LOCAL,
    TensorsNotCollocatedException,
    UnsupportedAttributeError,
    UnsupportedFeatureError,
)
from splitnn.syft.worker import VirtualWorker, check_worker, record
from splitnn.wire.tensor_codec import tensor_nbytes

#: Methods that would read a remote tensor's values without a recorded transfer.
_REVEALING = frozenset({"item", "tolist", "numpy"})

_SMPC = "splitnn has no secure computation; see README, 'Privacy at the cut' for the defenses it measures"
#: PySyft 0.2 pointer methods the facade does not provide: name -> (feature, what to use instead).
_PYSYFT_ONLY = {
    "share": ("additive secret sharing (.share)", _SMPC),
    "share_": ("additive secret sharing (.share_)", _SMPC),
    "encrypt": ("encrypted tensors (.encrypt)", _SMPC),
    "decrypt": ("encrypted tensors (.decrypt)", _SMPC),
    "fix_precision": ("fixed-precision tensors (.fix_precision)", "train in floating point"),
    "fix_prec": ("fixed-precision tensors (.fix_prec)", "train in floating point"),
    "float_precision": ("fixed-precision tensors (.float_precision)", "train in floating point"),
    "float_prec": ("fixed-precision tensors (.float_prec)", "train in floating point"),
    "private_tensor": ("private tensors (.private_tensor)", "keep the tensor at its worker and .get() it explicitly"),
    "send_": ("in-place send (.send_)", "use the pointer that .send() returns"),
    "get_": ("in-place get (.get_)", "use the tensor that .get() returns"),
    "remote_get": ("pointer chains (.remote_get)", "use .move(worker) to send a tensor on"),
    "remote_send": ("pointer chains (.remote_send)", "use .move(worker) to send a tensor on"),
    "mid_get": ("pointer chains (.mid_get)", "use .move(worker) to send a tensor on"),
}


class PointerTensor:
    """A tensor at worker ``location``.

    A pointer holds the real tensor (``child``), the worker it lives at
    (``location``) and what kind of thing it is for the ledger (``kind``:
    ``features``, ``labels``, ``activation`` or ``gradient``). Any torch operation
    on pointers (``nn.NLLLoss()(pred, target)``, ``x.view(...)``, ``a + b``) runs on
    the children when every tensor involved lives at the same worker and gives a
    pointer at that worker; otherwise it raises
    :class:`~splitnn.syft.exceptions.TensorsNotCollocatedException` naming both places.

    Transfers are explicit and recorded, with PySyft 0.2's semantics:

    - what travels is the values and the ``requires_grad`` flag, not the autograd
      graph: a tensor that required grad arrives as a leaf that requires grad;
    - :meth:`PointerTensor.move` sends the tensor on to another worker and the
      pointer follows it: the pointer it was called on and the one it returns both
      point at the destination (PySyft 0.2 sets ``ptr.location = destination``);
    - ``move(location, requires_grad=True)`` (and ``send(worker, requires_grad=True)``)
      also leaves PySyft's *origin backward hook* on the arrived tensor: when
      back-propagation reaches it, its gradient travels back to the sender (recorded
      as a ``gradient`` transfer) and back-propagation continues through the
      sender's graph, as PySyft's ``set_grad`` and ``backward`` messages do;
    - :meth:`PointerTensor.get` brings the tensor home; that pointer is spent
      (using it again raises a clear error).

    PySyft options that the facade does not provide raise
    :class:`~splitnn.syft.exceptions.UnsupportedFeatureError` naming them.
    """

    __slots__ = ("_child", "location", "kind")
    __hash__ = object.__hash__  # the comparison dunders below return pointers, not bools

    def __init__(self, child: torch.Tensor, location: VirtualWorker, kind: str) -> None:
        self._child: torch.Tensor | None = child
        self.location = location
        self.kind = kind

    @property
    def child(self) -> torch.Tensor:
        """The tensor itself (as the worker sees it)."""
        if self._child is None:
            raise WorkerError(
                f"this pointer to a tensor at {self.location.id!r} is spent: the tensor was brought home "
                f"with .get(); use the tensor that .get() returned"
            )
        return self._child

    # -- transfers -------------------------------------------------------------------
    def send(self, *location: Any, **options: Any) -> PointerTensor:
        """Refused: sending a pointer makes a pointer chain in PySyft; use :meth:`move`."""
        raise UnsupportedFeatureError(
            "sending a pointer on (a pointer chain)",
            f"this tensor is already at {self.location.id!r}: use .move(worker) to send it on, "
            f"or .get() to bring it home first",
        )

    def move(self, location: VirtualWorker, requires_grad: bool = False) -> PointerTensor:
        """Send the tensor from its worker straight to ``location``; this pointer follows it.

        As in PySyft 0.2, the pointer is updated in place and returned: afterwards
        both it and the returned pointer point at ``location`` (moving to where the
        tensor already is changes and records nothing). The transfer is recorded
        as this pointer's kind.

        Args:
            location: the worker to move the tensor to.
            requires_grad: if true and the tensor requires grad, back-propagation
                that reaches the moved tensor sends its gradient back to the
                sender (recorded as ``gradient``) and continues through the
                sender's graph there (PySyft's origin backward hook).
        """
        check_worker(location, "move")
        if location == self.location:
            return self
        child = self.child
        record(self.location, location, self.kind, tensor_nbytes(child))
        arrived = _over_the_wire(child)
        if requires_grad and child.requires_grad:
            arrived.register_hook(_origin_backward(child, sender=self.location, receiver=location))
        self._child, self.location = arrived, location
        return self

    def move_(self, location: VirtualWorker, requires_grad: bool = False) -> PointerTensor:
        """PySyft's in-place move: the same as :meth:`move`, which already updates this pointer."""
        return self.move(location, requires_grad)

    def get(self, **options: Any) -> torch.Tensor:
        """Bring the tensor home to the researcher (recorded; a computed result counts as ``output``).

        The pointer is spent afterwards. PySyft's ``inplace``, ``user``/``reason``
        (permissions) and ``get_copy`` options are refused with a clear error.
        """
        _refuse(
            "get",
            options,
            {
                "inplace": (False, "get(inplace=True) / get_()", "use the tensor that .get() returns"),
                "user": (None, "get(user=...) (private tensors)", "call .get() without it"),
                "reason": ("", "get(reason=...) (private tensors)", "call .get() without it"),
                "get_copy": (False, "get(get_copy=True)", "use .copy().get() to fetch a copy and keep the pointer"),
                "deregister_ptr": (True, "get(deregister_ptr=False)", "use .copy().get() to keep a pointer"),
            },
        )
        child = self.child
        kind = "output" if self.kind == "activation" else self.kind
        record(self.location, None, kind, tensor_nbytes(child))
        self._spend()
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
        if name in _PYSYFT_ONLY:
            raise UnsupportedAttributeError(*_PYSYFT_ONLY[name])
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
            return f"PointerTensor(at {self.location.id!r}, spent: brought home with .get())"
        t = self._child
        return f"PointerTensor(at {self.location.id!r}, {self.kind}, shape={tuple(t.shape)}, dtype={t.dtype})"

    def _spend(self) -> None:
        self._child = None


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


def send_tensor(tensor: torch.Tensor, *location: VirtualWorker, **options: Any) -> PointerTensor:
    """``tensor.send(worker, requires_grad=False)``: place a local tensor at ``worker``.

    Integer and bool tensors are recorded as ``labels``, others as ``features``.
    ``requires_grad=True`` leaves the origin backward hook (see the module
    docstring): the gradient that reaches the sent tensor comes home and
    back-propagates through the local graph. PySyft's other options are refused
    with a clear error, except ``garbage_collect_data`` (Python frees in-process
    tensors by itself).
    """
    requires_grad = bool(options.pop("requires_grad", False))
    options.pop("garbage_collect_data", None)
    _refuse(
        "send",
        options,
        {
            "inplace": (False, "send(..., inplace=True) / send_()", "use the pointer that .send() returns"),
            "local_autograd": (False, "send(..., local_autograd=True) (AutogradTensor)", "use requires_grad=True"),
            "preinitialize_grad": (False, "send(..., preinitialize_grad=True) (AutogradTensor)", "leave it out"),
            "no_wrap": (False, "send(..., no_wrap=True)", "use the pointer that .send() returns"),
            "user": (None, "send(..., user=...) (private tensors)", "leave it out"),
        },
    )
    if len(location) != 1:
        raise UnsupportedFeatureError(
            f"send() to {len(location)} workers at once (MultiPointerTensor)",
            "send one tensor to one worker per call: x.send(alice), x.send(bob)",
        )
    worker = check_worker(location[0], "send")
    if requires_grad and tensor.requires_grad and tensor.is_leaf:
        # PySyft 0.2 sets the origin's .grad and then back-propagates into it again, which doubles
        # a leaf's gradient; rather than train differently without saying so, refuse.
        raise UnsupportedFeatureError(
            "send(..., requires_grad=True) of a leaf tensor",
            "send a computed tensor (the output of your local layers), or send the leaf without "
            "requires_grad and bring its gradient home with pointer.grad.get()",
        )
    kind = "features" if (tensor.is_floating_point() or tensor.is_complex()) else "labels"
    record(None, worker, kind, tensor_nbytes(tensor))
    arrived = _over_the_wire(tensor)
    if requires_grad and tensor.requires_grad:
        arrived.register_hook(_origin_backward(tensor, sender=None, receiver=worker))
    return PointerTensor(arrived, worker, kind)


def _origin_backward(
    origin: torch.Tensor, sender: VirtualWorker | None, receiver: VirtualWorker
) -> Callable[[torch.Tensor], None]:
    """PySyft 0.2's origin backward hook, for a tensor that ``sender`` sent to ``receiver``.

    Registered on the arrived tensor; autograd calls it with the tensor's
    gradient. The gradient travels back (recorded as ``gradient``) and, as
    PySyft's ``set_grad`` and ``backward`` messages, becomes the origin's
    ``.grad`` and is back-propagated through the origin's graph at the sender.
    A leaf origin only takes the backward (its ``.grad`` is not set first: PySyft
    would double it; the facade never lets the researcher reach such a leaf).
    """

    def send_back(grad: torch.Tensor) -> None:
        record(receiver, sender, "gradient", tensor_nbytes(grad))
        grad = grad.detach()
        if not origin.is_leaf:
            origin.grad = grad
        origin.backward(grad)

    return send_back


def _refuse(method: str, options: dict[str, Any], known: dict[str, tuple[Any, str, str]]) -> None:
    """Raise for the first PySyft option given to ``method`` that the facade does not provide.

    ``known`` maps each PySyft option to (its default, the feature, what to use
    instead); an option given its default asks for nothing and is accepted.
    """
    for name, value in options.items():
        if name not in known:
            raise TypeError(f"{method}() got an unexpected keyword argument {name!r}")
        default, feature, instead = known[name]
        if value != default:
            raise UnsupportedFeatureError(feature, instead)


def _over_the_wire(tensor: torch.Tensor) -> torch.Tensor:
    """What arrives after a transfer: the values and the ``requires_grad`` flag, not the graph.

    As PySyft 0.2's serialization: a tensor that required grad (a leaf or a
    computed one) arrives as a leaf that requires grad. In-process the values are
    not copied (as with splitnn's VirtualWorker): the new tensor shares storage
    with the sent one but has its own autograd identity.
    """
    out = tensor.detach()
    if tensor.requires_grad:
        out.requires_grad_()
    return out
