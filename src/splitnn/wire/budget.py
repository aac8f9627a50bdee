"""What a received segment may allocate: shapes and sizes computed on meta tensors, against a budget.

:func:`guard_segment` installs the check on a built segment; its docstring says how the meta run
counts every new storage, what it refuses and what it does not bound.
"""

from __future__ import annotations

import copy
import operator
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from splitnn.errors import MemoryBudgetError, SpecError
from splitnn.wire.ops import function_name

__all__ = ["DEFAULT_MAX_SESSION_MEMORY", "SegmentGuard", "check_forward", "format_bytes", "guard_segment"]

#: Bytes one forward of a received segment may allocate (``splitnn worker --max-session-memory``).
DEFAULT_MAX_SESSION_MEMORY: int = 1 << 30
_MAX_INT = 2**64  # largest Python int a graph may compute
_MAX_SEQ = 65_536  # longest tuple, list or string a graph may compute
_CACHE = 64  # input signatures remembered per segment
_FLAG = "splitnn worker --max-session-memory"


def format_bytes(n: int) -> str:
    """``1073741824`` -> ``'1.00 GiB'``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


class _OverBudget(Exception):
    def __init__(self, op: str, total: int, view: bool = False) -> None:
        super().__init__(op)
        self.op, self.total, self.view = op, total, view


class _Counter(TorchDispatchMode):
    """Adds up the bytes of each new storage an op creates; factory ops are sent to ``meta``."""

    def __init__(self, budget: int, seen: list[torch.Tensor]) -> None:
        super().__init__()
        self.budget, self.total = budget, 0
        self.keep: list[Any] = [t.untyped_storage() for t in seen]  # alive: their ids stay unique
        self.seen = {s._cdata for s in self.keep}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = torch.device("meta")
        out = func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                logical = t.numel() * t.element_size()
                if logical > self.budget and logical > st.nbytes():  # an expand: what reads it reads it all
                    raise _OverBudget(str(func.overloadpacket.__name__), logical, view=True)
                if st._cdata not in self.seen:
                    self.seen.add(st._cdata)
                    self.keep.append(st)
                    self.total += st.nbytes()
        if self.total > self.budget:
            raise _OverBudget(str(func.overloadpacket.__name__), self.total)
        return out


class _MetaRun(fx.Interpreter):
    """Runs a graph on meta values, keeping the node it is at and bounding its Python values."""

    def __init__(self, gm: fx.GraphModule, path: str, where: list[str]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.extra_traceback = False  # the refusal names the node itself
        self.path, self.where = path, where
        self.index = {n: i for i, n in enumerate(gm.graph.nodes)}

    def run_node(self, n: fx.Node) -> Any:
        label = n.target if n.op != "call_function" else (function_name(n.target) or str(n.target))
        self.where[0] = f"{self.path}.nodes[{self.index[n]}] ({n.op} {label})"
        if n.op == "call_function":
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            _check_python_args(n.target, args, self.where[0])
            result = getattr(self, n.op)(n.target, args, kwargs)
            _check_python_value(result, self.where[0])
            return result
        return super().run_node(n)

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        sub = self.fetch_attr(target)
        return _run(sub, args, kwargs, f"{self.path}.modules[{target!r}]", self.where)


def _run(module: nn.Module, args: tuple, kwargs: dict, path: str, where: list[str]) -> Any:
    if isinstance(module, fx.GraphModule):
        return _MetaRun(module, path, where).run(*args, **kwargs)
    if type(module) is nn.Sequential and not kwargs and len(args) == 1:  # its graphs are interpreted too
        (value,) = args
        for i, child in enumerate(module):
            value = _run(child, (value,), {}, f"{path}.layers[{i}]", where)
        return value
    where[0] = path
    return module(*args, **kwargs)


def _check_python_args(fn: Callable[..., Any], args: tuple, where: str) -> None:
    ints = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
    if any(abs(a) > _MAX_INT for a in ints):
        raise MemoryBudgetError(f"{where}: a Python integer beyond 2**64; a graph computes sizes, not big numbers")
    if fn in (operator.pow, operator.lshift) and len(ints) == 2 and ints[1] > 64 and abs(ints[0]) > 1:
        raise MemoryBudgetError(f"{where}: {fn.__name__} with exponent {ints[1]} would exceed 2**64")
    if fn is operator.mul and len(args) == 2:
        seq = [a for a in args if isinstance(a, (str, tuple, list, bytes))]
        if seq and ints and len(seq[0]) * max(ints[0], 0) > _MAX_SEQ:
            raise MemoryBudgetError(f"{where}: a sequence of more than {_MAX_SEQ} items")


def _check_python_value(v: Any, where: str) -> None:
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > _MAX_INT:
        raise MemoryBudgetError(f"{where}: a Python integer beyond 2**64; a graph computes sizes, not big numbers")
    if isinstance(v, (str, tuple, list, bytes)) and len(v) > _MAX_SEQ:
        raise MemoryBudgetError(f"{where}: a sequence of more than {_MAX_SEQ} items")


def _to_meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        t = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
        return t.requires_grad_(v.requires_grad)
    return v


def check_forward(twin: nn.Module, args: tuple, kwargs: dict, budget: int, name: str) -> int:
    """Run ``twin`` (a module on the meta device) on meta copies of ``args``; the bytes it allocates.

    Raises :class:`MemoryBudgetError` naming the node at which the total passes ``budget``,
    or at which the meta run fails (an op whose sizes depend on the values, a shape error).
    """
    margs, mkwargs = pytree.tree_map(_to_meta, (args, kwargs))
    held = [t for t in pytree.tree_leaves((margs, mkwargs)) if isinstance(t, torch.Tensor)]
    held += list(twin.parameters()) + list(twin.buffers())
    where = [name]
    counter = _Counter(budget, held)
    try:
        with torch.device("meta"), counter:
            _run(twin, margs, mkwargs, name, where)
    except _OverBudget as over:
        what = "makes a tensor of" if over.view else "this forward would allocate"
        raise MemoryBudgetError(
            f"{where[0]}: {what} {format_bytes(over.total)} (at aten.{over.op}); the "
            f"worker's budget for one forward of a segment is {format_bytes(budget)} ({_FLAG}); send smaller "
            "batches or a smaller segment, or ask the operator to raise it"
        ) from None
    except MemoryBudgetError:
        raise
    except Exception as exc:
        raise MemoryBudgetError(
            f"{where[0]}: its sizes cannot be computed before it runs ({type(exc).__name__}: {str(exc)[:300]}); "
            "a segment's ops must have sizes that follow from the input shapes, so that what it allocates is "
            f"checked against the worker's budget ({_FLAG})"
        ) from None
    return counter.total


def _signature(args: tuple, kwargs: dict, training: bool) -> Any:
    if not kwargs and all(type(a) is torch.Tensor for a in args):  # the usual call: cheap
        return training, tuple((a.shape, a.stride(), a.dtype, a.requires_grad) for a in args)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    sig = []
    for v in leaves:
        if isinstance(v, torch.Tensor):
            sig.append(("T", tuple(v.shape), tuple(v.stride()), v.dtype, v.requires_grad))
        elif isinstance(v, (int, float, bool, str, type(None))):
            sig.append((type(v).__name__, v))
        else:
            sig.append(("?", type(v).__name__, id(v)))
    return training, str(spec), tuple(sig)


class GuardedForward:
    """A module's ``forward`` behind its :class:`SegmentGuard`, set on the instance, so that every call of the module
    runs the check first. (Not a forward pre-hook: any hook sends each call of the module through torch's slower
    path for hooks, which cost a networked batch of the tutorial network 4% of its samples/s,
    ``benchmarks/bench_ab.py``.) A deep copy of the module is guarded by a copy of the guard."""

    def __init__(self, module: nn.Module, guard: SegmentGuard) -> None:
        # (a weak reference: no cycle through the module, which is freed as soon as its worker drops it)
        self.module, self.guard = weakref.ref(module), guard

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module()
        self.guard(module, args, kwargs)
        return type(module).forward(module, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> GuardedForward:
        # (memo maps the module to its copy, made before its attributes are copied)
        module = self.module()
        return GuardedForward(memo.get(id(module), module), copy.deepcopy(self.guard, memo))


class SegmentGuard:
    """The meta check of :func:`check_forward` at each new input signature, called as a forward pre-hook is
    (``module, args, kwargs``): by the module's :class:`GuardedForward`, or as its pre-hook."""

    def __init__(self, twin: nn.Module, budget: int, name: str) -> None:
        self.twin, self.budget, self.name = twin, budget, name
        self.checked: OrderedDict[Any, int] = OrderedDict()

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sig = _signature(args, kwargs, module.training)
        if sig in self.checked:
            self.checked.move_to_end(sig)
            return None
        self.twin.train(module.training)
        self.checked[sig] = check_forward(self.twin, args, kwargs, self.budget, self.name)
        while len(self.checked) > _CACHE:
            self.checked.popitem(last=False)
        return None


def guard_segment(module: nn.Module, twin: nn.Module, budget: int, name: str = "segment") -> SegmentGuard:
    """Check every forward of ``module`` against ``budget`` bytes, on its meta twin ``twin``.

    ``twin`` is the same spec built under ``torch.device("meta")``. Returns the guard (its
    ``checked`` maps each input signature seen to the bytes it allocates).

    A worker runs segments another party sent. Their weights are bounded when they are built
    (:func:`splitnn.wire.spec.spec_to_module`, ``max_params``); what one forward allocates
    (``torch.ones(2**28)`` in a graph, an ``expand(...).contiguous()``, a ``Linear`` with a
    huge output) is bounded here. :func:`guard_segment` puts the check in front of the built
    module's forward (:class:`GuardedForward`): before the module runs at an input signature (shapes,
    dtypes, train or eval) it has not run at, its *meta twin* (the same spec built on the ``meta``
    device: no memory) runs on meta copies of the inputs under a dispatch mode that adds up the
    bytes of every new tensor storage any op creates (factory calls are forced onto ``meta`` too,
    so the check itself allocates nothing). Over ``budget`` bytes, the run is refused with
    :class:`~splitnn.errors.MemoryBudgetError` naming the node (``spec.nodes[5] (torch.ones)``),
    what it would allocate and the budget; nothing ran. Signatures that passed are cached, so
    every later run at that signature is one the check has seen: the budget holds while the
    segment runs, not only when it is installed.

    The op vocabulary (:mod:`splitnn.wire.ops`) is what makes the meta run faithful: its ops'
    output sizes follow from the input shapes, and an op whose sizes depend on the values
    (``nonzero``, ``.item()``) fails on meta, so it is refused here too. The Python values a
    graph computes (``operator.mul`` of two sizes) are bounded as they are computed: an int
    beyond 2**64 or a sequence beyond 65,536 items is refused before it can grow.

    The sum of every new storage is an upper bound of the forward's peak (it counts what
    autograd keeps for the backward pass as well); allocations inside a single kernel
    (workspaces) are not seen. No view larger than its storage (an ``expand``) may be larger than
    the budget either: an ``expand`` to 2**40 elements allocates nothing, but a reduction over it
    would read them all. CPU time is not budgeted.
    """
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise SpecError(f"a memory budget is a number of bytes >= 1, got {budget!r}")
    guard = SegmentGuard(twin, budget, name)
    if "forward" in module.__dict__:  # a forward of its own already: the hook, which torch calls before it
        module.register_forward_pre_hook(guard, with_kwargs=True)
    else:
        module.forward = GuardedForward(module, guard)
    return guard
