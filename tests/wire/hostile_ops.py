"""Run every op of the graph vocabulary with hostile arguments, as a worker would:
``python -m tests.wire.hostile_ops EXAMPLES [--random]``. Run in a subprocess by tests/wire/test_wire_ops_hostile.py,
which asserts that it exits normally (a crashing kernel kills it by a signal) and prints ``ok``.

Each example is one graph (placeholders for the tensor arguments, one ``call_function``/``call_method`` node)
built as a worker builds a received segment: the spec is checked (a refusal is fine), the meta check guards
the run against a small budget, and the call runs twice, after the freed heap was filled with two different
patterns. An op that reads memory it never wrote gives two different answers; that fails the run.
"""

from __future__ import annotations

import math
import sys

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitnn.errors import SpecError
from splitnn.wire.budget import guard_segment
from splitnn.wire.ops import allowed_functions, allowed_methods
from splitnn.wire.spec import spec_to_module

BUDGET = 8 << 20
OPS = sorted(n for n in allowed_functions() if n != "getattr") + sorted(f"method:{m}" for m in allowed_methods())
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool]
_BIG = [-(2**63), -(10**8), -(2**31), -1, 0, 1, 2, 3, 7, 10**8, 2**31, 2**40, 2**62]
_FLOATS = [0.0, -0.0, 1.5, -3.0, 1e30, -1e30, math.inf, -math.inf, math.nan, 1e-300]


@st.composite
def _tensors(draw):
    shape = draw(st.lists(st.integers(0, 4), max_size=4))
    dtype = draw(st.sampled_from(_DTYPES))
    kind = draw(st.sampled_from(["small", "wild", "index"]))
    n = math.prod(shape)
    if kind == "index":
        vals = draw(st.lists(st.sampled_from(_BIG[:10]), min_size=n, max_size=n))
        t = torch.tensor(vals, dtype=torch.int64).reshape(shape)
        return t
    vals = draw(st.lists(st.sampled_from(_FLOATS) if kind == "wild" else st.floats(-4, 4), min_size=n, max_size=n))
    t = torch.tensor(vals, dtype=torch.float64).reshape(shape)
    with torch.no_grad():
        return t.nan_to_num(0.0, 1e4, -1e4).to(dtype) if not dtype.is_floating_point else t.to(dtype)


_scalar = (
    st.sampled_from(_BIG)
    | st.integers(-3, 4)
    | st.sampled_from(_FLOATS)
    | st.booleans()
    | st.none()
    | st.sampled_from(["sum", "mean", "none", "nearest", "bilinear", "reflect", "constant", "same", "fro"])
)
_value = _scalar | st.lists(st.sampled_from(_BIG) | st.integers(-2, 4), max_size=4).map(tuple)
_KWARGS = [
    "dim",
    "keepdim",
    "size",
    "dtype",
    "p",
    "k",
    "kernel_size",
    "stride",
    "padding",
    "scale_factor",
    "mode",
    "weight",
    "bias",
    "num_classes",
    "diagonal",
    "repeats",
    "output_size",
    "eps",
    "value",
]


@st.composite
def _plausible(draw):
    """Arguments most ops take (a float tensor, then one like it or a small number), so that they run,
    with hostile values inside: NaN, inf, huge magnitudes, empty and odd shapes."""
    shape = draw(st.lists(st.integers(0, 3), min_size=1, max_size=4))
    n = math.prod(shape)

    def tensor():
        vals = draw(st.lists(st.sampled_from(_FLOATS) | st.floats(-4, 4), min_size=n, max_size=n))
        return torch.tensor(vals, dtype=torch.float32).reshape(shape)

    rest = draw(st.lists(st.sampled_from(["tensor", "int", "float"]), max_size=2))
    ints = st.integers(-3, 3) | st.sampled_from(_BIG)
    return [tensor()] + [tensor() if r == "tensor" else draw(ints if r == "int" else st.floats(-2, 2)) for r in rest]


@st.composite
def _schema_args(draw, op: str):
    """Positional arguments of an ATen overload drawn by its schema's types (a tensor where it takes a tensor, a
    list of sizes where it takes one, ...), with hostile values; an ATen overload refuses a wrong type outright,
    so arguments drawn for Python-level ops would mostly never reach its kernel."""
    args = []
    for a in allowed_functions()[op]._schema.arguments:
        kind = str(a.type)
        if a.kwarg_only or (a.has_default_value() and draw(st.booleans())):
            break
        if kind.startswith("Tensor") and "[]" in kind:
            value = tuple(draw(st.lists(_tensors() | _plausible().map(lambda v: v[0]), min_size=1, max_size=3)))
        elif kind.startswith("Tensor"):
            value = draw(_plausible().map(lambda v: v[0]) | _tensors())
        elif "[]" in kind:
            value = tuple(draw(st.lists(st.integers(-2, 4) | st.sampled_from(_BIG), max_size=4)))
        elif kind.startswith(("int", "SymInt")):
            value = draw(st.integers(-3, 4) | st.sampled_from(_BIG))
        elif kind.startswith(("float", "Scalar", "number")):
            value = draw(st.sampled_from(_FLOATS) | st.floats(-4, 4) | st.integers(-3, 3))
        elif kind.startswith("bool"):
            value = draw(st.booleans())
        elif kind.startswith("str"):
            value = draw(st.sampled_from(["none", "tanh", "sum", "x"]))
        else:
            value = None  # dtype, layout, device, memory format: their defaults
        args.append(value)
    return args


@st.composite
def _fitting(draw, op: str):
    """A call of an ATen overload whose shapes fit (matrix products, attention, convolutions, indexing), with
    hostile values inside: NaN, inf, huge magnitudes, out-of-range and negative indices."""

    def t(*shape):
        vals = draw(st.lists(st.sampled_from(_FLOATS) | st.floats(-4, 4), min_size=math.prod(shape)))
        return torch.tensor(vals[: math.prod(shape)], dtype=torch.float32).reshape(shape)

    def idx(*shape):
        vals = draw(st.lists(st.sampled_from(_BIG[:10]) | st.integers(0, 3), min_size=math.prod(shape)))
        return torch.tensor(vals[: math.prod(shape)], dtype=torch.int64).reshape(shape)

    sizes = st.lists(st.sampled_from([-1, 0, 1, 2, 3, 4, 6, 12, 2**40]), min_size=1, max_size=3).map(tuple)
    calls = {
        "aten.addmm.default": lambda: [t(3), t(2, 4), t(4, 3)],
        "aten.amax.default": lambda: [t(2, 3), (draw(st.integers(-3, 3)),)],
        "aten.baddbmm.default": lambda: [t(2, 3, 5), t(2, 3, 4), t(2, 4, 5)],
        "aten.bmm.default": lambda: [t(2, 3, 4), t(2, 4, 5)],
        "aten.mm.default": lambda: [t(3, 4), t(4, 2)],
        "aten.cat.default": lambda: [(t(2, 3), t(1, 3)), draw(st.integers(-3, 2))],
        "aten.stack.default": lambda: [(t(2, 3), t(2, 3)), draw(st.integers(-3, 3))],
        "aten.conv2d.default": lambda: [t(1, 2, 5, 5), t(3, 2, 3, 3), None, (draw(st.integers(1, 3)),) * 2],
        "aten.embedding.default": lambda: [t(5, 3), idx(2, 4)],
        "aten.index.Tensor": lambda: [t(4, 3), (idx(2),)],
        "aten.index_select.default": lambda: [t(4, 3), draw(st.integers(-2, 1)), idx(3)],
        "aten.layer_norm.default": lambda: [t(2, 4), (4,), t(4), t(4)],
        "aten.rms_norm.default": lambda: [t(2, 4), (4,), t(4)],
        "aten.scaled_dot_product_attention.default": lambda: [t(1, 2, 3, 4), t(1, 2, 5, 4), t(1, 2, 5, 4)],
        "aten.select.int": lambda: [t(3, 4), draw(st.integers(-2, 1)), draw(st.sampled_from(_BIG[:10]))],
        "aten.expand.default": lambda: [t(1, 3), draw(sizes)],
        "aten.new_ones.default": lambda: [t(2), draw(sizes)],
        "aten.permute.default": lambda: [t(2, 3, 4), tuple(draw(st.permutations([0, 1, 2])))],
        "aten.reshape.default": lambda: [t(2, 6), draw(sizes)],
        "aten.view.default": lambda: [t(2, 6), draw(sizes)],
        "aten.unflatten.int": lambda: [t(2, 6), 1, draw(sizes)],
        "aten.to.device": lambda: [t(3), {"device": "cpu"}, {"dtype": "float64"}],
        "aten.where.self": lambda: [t(3) > 0, t(3), t(2, 1)],
    }
    return op, calls[op](), {}


_FITTING = {
    "aten.addmm.default", "aten.amax.default", "aten.baddbmm.default", "aten.bmm.default", "aten.mm.default",
    "aten.cat.default", "aten.stack.default", "aten.conv2d.default", "aten.embedding.default", "aten.index.Tensor",
    "aten.index_select.default", "aten.layer_norm.default", "aten.rms_norm.default",
    "aten.scaled_dot_product_attention.default", "aten.select.int", "aten.expand.default", "aten.new_ones.default",
    "aten.permute.default", "aten.reshape.default", "aten.view.default", "aten.unflatten.int", "aten.to.device",
    "aten.where.self",
}  # fmt: skip


@st.composite
def _calls(draw, op: str):
    if op in _FITTING and draw(st.booleans()):
        return draw(_fitting(op))
    if op.startswith("aten.") and draw(st.booleans()):
        return op, draw(_schema_args(op)), {}
    if draw(st.booleans()):
        return op, draw(_plausible()), {}
    args = draw(st.lists(st.one_of(_tensors(), _value), max_size=4))
    if op.startswith("method:") or draw(st.integers(0, 4)):  # mostly a tensor first, as most ops take
        args = [draw(_tensors()), *args]
    kwargs = draw(st.dictionaries(st.sampled_from(_KWARGS), _value | _tensors(), max_size=2))
    return op, args, kwargs


def _encode(v, tensors: list[torch.Tensor]):
    if isinstance(v, torch.Tensor):
        tensors.append(v)
        return {"node": len(tensors) - 1}
    if isinstance(v, float) and not math.isfinite(v):
        return {"float": repr(v)}
    if isinstance(v, tuple):
        return [_encode(x, tensors) for x in v]
    return v


def _graph(op: str, args: list, kwargs: dict) -> tuple[dict, list[torch.Tensor]]:
    tensors: list[torch.Tensor] = []
    eargs = [_encode(a, tensors) for a in args]
    ekwargs = {k: _encode(v, tensors) for k, v in kwargs.items()}
    nodes = [{"op": "placeholder"} for _ in tensors]
    shift = len(nodes)  # tensor i is node i already
    kind, target = ("call_method", op[7:]) if op.startswith("method:") else ("call_function", op)
    nodes.append({"op": kind, "target": target, "args": eargs, "kwargs": ekwargs})
    nodes.append({"op": "output", "args": [{"node": shift}]})
    return {"type": "Graph", "modules": {}, "attrs": {}, "nodes": nodes}, tensors


def _scribble(pattern: float) -> None:
    """Fill freed heap with ``pattern``: memory an op allocates without writing then holds it."""
    for n in (1 << 6, 1 << 10, 1 << 14, 1 << 18):
        junk = torch.full((n,), pattern)
        del junk


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() or a.is_complex():
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


COUNTS = {"refused": 0, "failed": 0, "ran": 0}
RAN: set[str] = set()  # ops that ran at least once


def _run(module, tensors, pattern: float):
    _scribble(pattern)
    torch.manual_seed(0)  # random ops draw the same numbers both times
    try:
        with torch.no_grad():
            out = module(*tensors)
    except Exception:
        return "failed"
    return out.detach().clone() if isinstance(out, torch.Tensor) else out


def check(op: str, args: list, kwargs: dict) -> None:
    spec, tensors = _graph(op, args, kwargs)
    try:
        module = spec_to_module(spec)
        with torch.device("meta"):
            twin = spec_to_module(spec)
    except SpecError:
        COUNTS["refused"] += 1
        return
    guard_segment(module, twin, BUDGET, "hostile: spec")
    first = _run(module, tensors, 1.2345e-8)
    second = _run(module, tensors, -9.876e20)
    if isinstance(first, str) or isinstance(second, str):
        assert first == second, f"{op}: ran once and failed once with the same arguments"
        COUNTS["failed"] += 1
        return
    assert _same(first, second), f"{op} {args!r} {kwargs!r}: two runs differ (an uninitialised read?)"
    COUNTS["ran"] += 1
    RAN.add(op)


def main(examples: int) -> None:
    """``examples`` hostile calls of every op of the vocabulary."""
    for op in OPS:
        # derandomized: the suite runs the same examples every time (a fresh random draw can pick a call whose CPU
        # time -- not budgeted, unlike memory -- runs to minutes); `--random` explores new ones
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=not RANDOM,
            suppress_health_check=list(HealthCheck),
        )
        @given(_calls(op))
        def run(call):
            check(*call)

        run()
    print(f"ok {len(OPS)} ops, {len(RAN)} ran at least once, {COUNTS}", flush=True)


RANDOM = "--random" in sys.argv

if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
