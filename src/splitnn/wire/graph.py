"""A ``torch.fx`` segment as data: its graph in JSON, never code.

:func:`splitnn.cut` turns a non-sequential model into ``GraphModule`` segments. To send
one to a remote party, :mod:`splitnn.wire.spec` describes it as::

    {"type": "Graph",
     "modules": {"layer1.0.conv1": {"type": "Conv2d", ...}, "layer2.0": {"import": "mypkg:Block", ...}},
     "attrs":   {"scale": {"kind": "buffer", "shape": [1], "dtype": "float32", "requires_grad": false}},
     "nodes":   [{"op": "placeholder"},
                 {"op": "call_module", "target": "layer1.0.conv1", "args": [{"node": 0}], "kwargs": {}},
                 {"op": "call_function", "target": "torch.nn.functional.relu", "args": [{"node": 1}],
                  "kwargs": {"inplace": false}},
                 {"op": "output", "args": [{"node": 2}]}]}

Ops: ``placeholder``, ``output``, ``call_module`` on a submodule named in ``modules``
(each a spec of its own: a registered layer, a ``Sequential``, a trusted import, another
graph), ``get_attr`` on a parameter or buffer declared in ``attrs`` (its values travel
with the weights; a small ``"constant"``, a buffer the model does not save such as
position ids, carries its ``"values"`` in the spec), and ``call_function`` /
``call_method`` only on the op vocabulary of :mod:`splitnn.wire.ops` (dense, functional
ops, Python-level or ATen, e.g. ``"aten.linear.default"``: no ``out=``, no in-place
writes, no uninitialised, sparse or pointer ops) and ``getattr`` of a few tensor
properties (``shape``, ``dtype``, ...). Sender and receiver check the same vocabulary. Names are
looked up in it; nothing is imported, ``eval``-ed or ``exec``-ed from the text, and the
receiver generates the forward code itself from the checked graph (fx's code generator,
with generated names). What a graph may allocate when it runs is checked separately, on
meta tensors, against the worker's memory budget (:mod:`splitnn.wire.budget`).

Values in ``args``/``kwargs``: JSON null, booleans, numbers and strings as themselves; a
JSON array is a Python tuple; ``{"list": [...]}``, ``{"node": i}`` (the result of node
``i``, which must come earlier: no cycles, no dangling references), ``{"slice": [a, b, c]}``,
``{"ellipsis": true}``, ``{"dtype": "float32"}``, ``{"float": "inf"}``, ``{"device": "cpu"}`` and
``{"layout": "strided"}`` for the rest.

Every check runs before anything is built; a problem raises :class:`SpecError` naming
the node (``spec.nodes[3]``) and what is wrong.
"""

from __future__ import annotations

import builtins
import functools
import inspect
import keyword
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from splitnn.errors import SpecError
from splitnn.wire.ops import GETATTR_NAMES, allowed_functions, allowed_methods, check_call, function_name

__all__ = [
    "GETATTR_NAMES",
    "GRAPH_TYPE",
    "MAX_GRAPH_NODES",
    "GraphPlan",
    "allowed_functions",
    "allowed_methods",
    "build_graph",
    "describe_graph",
    "plan_graph",
]

#: The ``"type"`` of a graph spec.
GRAPH_TYPE = "Graph"
#: Most nodes one graph may have.
MAX_GRAPH_NODES = 4096
#: Most dimensions of a declared attribute.
MAX_ATTR_NDIM = 16
#: Most elements of a constant whose values travel in the spec.
MAX_CONSTANT_ELEMENTS = 4096

_OPS = ("placeholder", "get_attr", "call_module", "call_function", "call_method", "output")

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    )
}
_COMPONENT = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_SPECIAL_KEYS = ("node", "list", "slice", "ellipsis", "dtype", "float", "device", "layout")
_DEVICE = re.compile(r"^(cpu|meta|cuda(:[0-9]{1,2})?)$")


# ----------------------------------------------------------------------------- targets


@functools.cache
def _reserved_names() -> frozenset[str]:
    """Attribute names a submodule path may not use: they belong to GraphModule/nn.Module itself."""
    sample = fx.GraphModule(nn.Module(), fx.Graph())
    return frozenset(dir(fx.GraphModule)) | frozenset(vars(sample)) | frozenset(vars(nn.Module()))


def _check_target(target: Any, where: str) -> str:
    if not isinstance(target, str) or not target or len(target) > 256:
        raise SpecError(f"{where}: a target must be a dotted name like 'layer1.0.conv1', got {target!r}")
    for part in target.split("."):
        if not _COMPONENT.match(part) or part.startswith("__") or part in _reserved_names():
            raise SpecError(
                f"{where}: target {target!r} has the part {part!r}; parts are letters, digits and '_' "
                "and may not name an attribute of the module itself"
            )
    return target


# ----------------------------------------------------------------------------- GraphModule -> spec


def describe_graph(gm: fx.GraphModule, path: str, describe_module: Callable[[nn.Module, str], dict]) -> dict:
    """The graph spec of ``gm``; ``describe_module(module, path)`` describes each called submodule."""
    nodes = list(gm.graph.nodes)
    if len(nodes) > MAX_GRAPH_NODES:
        raise SpecError(f"{path}: the graph has {len(nodes)} nodes; at most {MAX_GRAPH_NODES} travel as data")
    index = {n: i for i, n in enumerate(nodes)}
    modules: dict[str, dict] = {}
    attrs: dict[str, dict] = {}
    out: list[dict] = []
    for i, n in enumerate(nodes):
        where = f"{path}.nodes[{i}] ({n.op} {n.name})"

        def enc(a: Any, where: str = where) -> Any:
            return _encode(a, index, where)

        if n.op == "placeholder":
            entry: dict = {"op": "placeholder"}
            if n.args:  # a default value
                entry["default"] = enc(n.args[0])
        elif n.op == "output":
            entry = {"op": "output", "args": [enc(n.args[0])]}
        else:
            entry = {"op": n.op, "target": _target_name(gm, n, where)}
            if n.op == "call_module" and n.target not in modules:
                modules[n.target] = describe_module(gm.get_submodule(n.target), f"{path}.modules[{n.target!r}]")
            if n.op == "get_attr":
                attrs[n.target] = _describe_attr(gm, n.target, where)
            else:
                entry["args"] = [enc(a) for a in n.args]
                entry["kwargs"] = {k: enc(v) for k, v in n.kwargs.items()}
        out.append(entry)
    return {"type": GRAPH_TYPE, "modules": modules, "attrs": attrs, "nodes": out}


def _target_name(gm: fx.GraphModule, n: fx.Node, where: str) -> str:
    if n.op in ("call_module", "get_attr"):
        return _check_target(n.target, where)
    if n.op == "call_method":
        name, fn = str(n.target), None
    else:
        fn = n.target
        name = function_name(fn) or _qualified(fn)
        fn = fn if function_name(fn) else None
    why = check_call(n.op, name, fn, n.args, dict(n.kwargs))
    if why is not None:
        raise SpecError(f"{where}: {why}")
    return name


def _qualified(fn: Any) -> str:
    if isinstance(fn, torch._ops.OpOverload):
        return f"aten.{fn._opname}.{fn._overloadname}" if fn.namespace == "aten" else str(fn)
    return getattr(fn, "__module__", "?") + "." + getattr(fn, "__qualname__", repr(fn))


def _describe_attr(gm: fx.GraphModule, target: str, where: str) -> dict:
    owner_path, _, field = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if field in owner._parameters and owner._parameters[field] is not None:
        t, kind = owner._parameters[field], "parameter"
    elif field in owner._buffers and owner._buffers[field] is not None:
        t, kind = owner._buffers[field], "buffer"
        if field in owner._non_persistent_buffers_set:  # not in the state dict: its values travel here
            return _describe_constant(t, target, where)
    else:
        raise SpecError(f"{where}: {target!r} is not a parameter or buffer; only those travel (with the weights)")
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise SpecError(f"{where}: {target!r} has dtype {dtype}, which cannot travel")
    return {"kind": kind, "shape": list(t.shape), "dtype": dtype, "requires_grad": bool(t.requires_grad)}


def _describe_constant(t: torch.Tensor, target: str, where: str) -> dict:
    dtype = str(t.dtype).removeprefix("torch.")
    if t.numel() > MAX_CONSTANT_ELEMENTS or dtype not in _DTYPES or t.is_complex():
        raise SpecError(
            f"{where}: buffer {target!r} is not persistent (not in the state dict), so its values would travel in "
            f"the spec, which holds constants of at most {MAX_CONSTANT_ELEMENTS} real elements; it has "
            f"{t.numel()} of {dtype}. Register it as a persistent buffer, so that it travels with the weights"
        )
    values = t.detach().cpu().reshape(-1).tolist()
    if not all(math.isfinite(v) for v in values if isinstance(v, float)):
        raise SpecError(f"{where}: constant {target!r} holds inf or NaN; register it as a persistent buffer")
    return {"kind": "constant", "shape": list(t.shape), "dtype": dtype, "requires_grad": False, "values": values}


def _encode(a: Any, index: dict[fx.Node, int], where: str) -> Any:
    if isinstance(a, fx.Node):
        return {"node": index[a]}
    if a is None or isinstance(a, (bool, str)):
        return a
    if isinstance(a, int):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, tuple):  # torch.Size too
        return [_encode(x, index, where) for x in a]
    if isinstance(a, list):
        return {"list": [_encode(x, index, where) for x in a]}
    if isinstance(a, slice):
        return {"slice": [_encode(x, index, where) for x in (a.start, a.stop, a.step)]}
    if a is Ellipsis:
        return {"ellipsis": True}
    if isinstance(a, torch.dtype) and str(a).removeprefix("torch.") in _DTYPES:
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device) and _DEVICE.match(str(a)):
        return {"device": str(a)}
    if a is torch.strided:
        return {"layout": "strided"}
    raise SpecError(f"{where}: cannot describe the argument {a!r} ({type(a).__name__}) as data")


# ----------------------------------------------------------------------------- spec -> plan


@dataclass
class GraphPlan:
    """A checked graph spec, ready to build (``modules`` holds the caller's plans of the submodules)."""

    modules: dict[str, Any]
    attrs: dict[str, tuple[str, tuple[int, ...], torch.dtype, bool, list | None]]  # values: constants only
    nodes: list[tuple[str, Any, tuple, dict]]  # (op, target or default, args, kwargs), decoded
    path: str

    def attr_elements(self) -> int:
        """Elements of the declared parameters and buffers."""
        return sum(math.prod(shape) for _, shape, _, _, _ in self.attrs.values())


def plan_graph(spec: dict, path: str, plan_module: Callable[[Any, str], Any]) -> GraphPlan:
    """Check a graph spec (see the module docstring); ``plan_module(spec, path)`` checks each submodule."""
    extra = set(spec) - {"type", "modules", "attrs", "nodes"}
    if extra:
        raise SpecError(f"{path} (Graph): unexpected key(s) {sorted(extra)}; expected 'modules', 'attrs', 'nodes'")
    modules, attrs, nodes = spec.get("modules", {}), spec.get("attrs", {}), spec.get("nodes")
    if not isinstance(modules, dict) or not isinstance(attrs, dict):
        raise SpecError(f"{path} (Graph): 'modules' and 'attrs' must be objects")
    if not isinstance(nodes, list) or not 1 <= len(nodes) <= MAX_GRAPH_NODES:
        raise SpecError(f"{path} (Graph): 'nodes' must be a list of 1 to {MAX_GRAPH_NODES} nodes")
    targets = list(modules) + list(attrs)
    for t in modules:
        _check_target(t, f"{path}.modules")
    for t in attrs:
        _check_target(t, f"{path}.attrs")
    dup = set(modules) & set(attrs)
    if dup:
        raise SpecError(f"{path} (Graph): {sorted(dup)[0]!r} is both a module and an attribute")
    for t in targets:
        for other in targets:
            if other.startswith(t + "."):
                raise SpecError(f"{path} (Graph): target {other!r} lies inside target {t!r}; name each once")
    plans = {t: plan_module(s, f"{path}.modules[{t!r}]") for t, s in modules.items()}
    decoded_attrs = {t: _plan_attr(a, f"{path}.attrs[{t!r}]") for t, a in attrs.items()}
    used: set[str] = set()
    decoded: list[tuple[str, Any, tuple, dict]] = []
    seen_other = False
    for i, node in enumerate(nodes):
        where = f"{path}.nodes[{i}]"
        decoded.append(_plan_node(node, i, len(nodes), where, modules, attrs, used, seen_other))
        seen_other = seen_other or decoded[-1][0] != "placeholder"
    unused = sorted(set(targets) - used)
    if unused:
        raise SpecError(f"{path} (Graph): {unused[0]!r} is declared but no node uses it")
    return GraphPlan(plans, decoded_attrs, decoded, path)


def _plan_attr(a: Any, where: str) -> tuple[str, tuple[int, ...], torch.dtype, bool, list | None]:
    keys = {"kind", "shape", "dtype", "requires_grad"}
    if not isinstance(a, dict) or set(a) - {"values"} != keys:
        raise SpecError(f"{where}: an attribute is {{kind, shape, dtype, requires_grad}} (and values), got {a!r:.200}")
    kind, shape, dtype, rg = a["kind"], a["shape"], a["dtype"], a["requires_grad"]
    if kind not in ("parameter", "buffer", "constant"):
        raise SpecError(f"{where}: kind must be 'parameter', 'buffer' or 'constant', got {kind!r}")
    if ("values" in a) != (kind == "constant"):
        raise SpecError(f"{where}: a constant carries its 'values', and only a constant does")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_ATTR_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
    ):
        raise SpecError(f"{where}: shape must be a list of at most {MAX_ATTR_NDIM} sizes >= 0, got {shape!r}")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise SpecError(f"{where}: unknown dtype {dtype!r:.40} (known: {', '.join(_DTYPES)})")
    if not isinstance(rg, bool) or (rg and not (_DTYPES[dtype].is_floating_point or _DTYPES[dtype].is_complex)):
        raise SpecError(f"{where}: requires_grad must be a boolean, and true only for a floating dtype")
    values = _plan_constant(a["values"], shape, _DTYPES[dtype], rg, where) if kind == "constant" else None
    return kind, tuple(shape), _DTYPES[dtype], rg, values


def _plan_constant(values: Any, shape: list[int], dtype: torch.dtype, rg: bool, where: str) -> list:
    n = math.prod(shape)
    if rg or dtype.is_complex or n > MAX_CONSTANT_ELEMENTS:
        raise SpecError(
            f"{where}: a constant is real, needs no gradient and has at most {MAX_CONSTANT_ELEMENTS} elements"
        )
    if not isinstance(values, list) or len(values) != n:
        raise SpecError(f"{where}: 'values' must be a flat list of the {n} elements of shape {shape}")
    if dtype is torch.bool:
        ok = all(isinstance(v, bool) for v in values)
    elif dtype.is_floating_point:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    else:
        info = torch.iinfo(dtype)
        ok = all(isinstance(v, int) and not isinstance(v, bool) and info.min <= v <= info.max for v in values)
    if not ok:
        raise SpecError(f"{where}: 'values' must all be {dtype} values (finite, in range)")
    return values


def _plan_node(
    node: Any, i: int, count: int, where: str, modules: dict, attrs: dict, used: set[str], seen_other: bool
) -> tuple[str, Any, tuple, dict]:
    if not isinstance(node, dict):
        raise SpecError(f"{where}: a node must be an object with an 'op', got {type(node).__name__}")
    op = node.get("op")
    if op not in _OPS:
        raise SpecError(f"{where}: unknown op {op!r}; graph ops are {', '.join(_OPS)}")
    if (op == "output") != (i == count - 1):
        raise SpecError(f"{where}: the graph needs exactly one 'output' node, as its last node")
    if op == "placeholder":
        if seen_other:
            raise SpecError(f"{where}: placeholders (the segment's inputs) must come before every other node")
        _keys(node, {"op"}, {"default"}, where)
        default = _decode(node["default"], 0, where) if "default" in node else inspect.Signature.empty
        return op, default, (), {}
    if op == "output":
        _keys(node, {"op", "args"}, set(), where)
        args = node["args"]
        if not isinstance(args, list) or len(args) != 1:
            raise SpecError(f"{where}: an output node has 'args': [value]")
        return op, None, (_decode(args[0], i, where),), {}
    if op == "get_attr":
        _keys(node, {"op", "target"}, set(), where)
        target = node["target"]
        if not isinstance(target, str) or target not in attrs:
            raise SpecError(f"{where}: get_attr target {target!r} is not declared in 'attrs'")
        used.add(target)
        return op, target, (), {}
    _keys(node, {"op", "target", "args", "kwargs"}, set(), where)
    target, args, kwargs = node["target"], node["args"], node["kwargs"]
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise SpecError(f"{where}: 'args' must be a list and 'kwargs' an object")
    for k in kwargs:
        if not k.isidentifier() or keyword.iskeyword(k) or k.startswith("__"):
            raise SpecError(f"{where}: keyword argument name {k!r} is not a plain identifier")
    args_t = tuple(_decode(a, i, f"{where}.args[{j}]") for j, a in enumerate(args))
    kwargs_d = {k: _decode(v, i, f"{where}.kwargs.{k}") for k, v in kwargs.items()}
    if op == "call_module":
        if not isinstance(target, str) or target not in modules:
            raise SpecError(f"{where}: call_module target {target!r} is not declared in 'modules'")
        used.add(target)
        return op, target, args_t, kwargs_d
    if op == "call_method":
        if not isinstance(target, str):
            raise SpecError(f"{where}: a call_method target is a tensor method's name, got {target!r:.80}")
        why = check_call(op, target, None, args_t, kwargs_d)
        if why is not None:
            raise SpecError(f"{where}: {why}")
        if not args_t or not isinstance(args_t[0], _NodeRef):
            raise SpecError(
                f"{where}: call_method {target!r} needs the value it is called on (a node, {{'node': i}}) as its "
                "first argument"
            )
        return op, target, args_t, kwargs_d
    if not isinstance(target, str):
        raise SpecError(f"{where}: a call_function target is a function's name, got {target!r:.80}")
    fn = allowed_functions().get(target)
    why = check_call(op, target, fn, args_t, kwargs_d)
    if why is not None:
        raise SpecError(f"{where}: {why}")
    if fn is builtins.getattr and (
        len(args_t) != 2 or kwargs_d or not isinstance(args_t[1], str) or args_t[1] not in GETATTR_NAMES
    ):
        raise SpecError(f"{where}: getattr may only read {sorted(GETATTR_NAMES)} of a value")
    return op, fn, args_t, kwargs_d


def _keys(node: dict, required: set[str], optional: set[str], where: str) -> None:
    missing = required - set(node)
    extra = set(node) - required - optional
    if missing or extra:
        raise SpecError(
            f"{where} ({node.get('op')}): "
            + (f"missing {sorted(missing)}" if missing else f"unexpected key(s) {sorted(extra)}")
        )


class _NodeRef:
    """A decoded ``{"node": i}``: replaced by the built fx node."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _decode(v: Any, current: int, where: str) -> Any:
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if isinstance(v, float):
        return v
    if isinstance(v, list):
        return tuple(_decode(x, current, where) for x in v)
    if not isinstance(v, dict) or len(v) != 1 or next(iter(v)) not in _SPECIAL_KEYS:
        raise SpecError(f"{where}: a value object must have one key of {_SPECIAL_KEYS}, got {v!r:.80}")
    ((key, x),) = v.items()
    if key == "node":
        if not (isinstance(x, int) and not isinstance(x, bool) and 0 <= x < current):
            raise SpecError(f"{where}: {{'node': {x!r}}} must name an earlier node (0..{current - 1})")
        return _NodeRef(x)
    if key == "list":
        if not isinstance(x, list):
            raise SpecError(f"{where}: 'list' holds a list, got {x!r:.80}")
        return [_decode(y, current, where) for y in x]
    if key == "slice":
        if not isinstance(x, list) or len(x) != 3:
            raise SpecError(f"{where}: 'slice' holds [start, stop, step], got {x!r:.80}")
        return slice(*(_decode(y, current, where) for y in x))
    if key == "ellipsis":
        if x is not True:
            raise SpecError(f"{where}: 'ellipsis' must be true")
        return Ellipsis
    if key == "dtype":
        if not isinstance(x, str) or x not in _DTYPES:
            raise SpecError(f"{where}: unknown dtype {x!r}")
        return _DTYPES[x]
    if key == "device":
        if not isinstance(x, str) or not _DEVICE.match(x):
            raise SpecError(f"{where}: 'device' is 'cpu', 'cuda', 'cuda:N' or 'meta', got {x!r:.80}")
        return torch.device(x)
    if key == "layout":
        if x != "strided":
            raise SpecError(f"{where}: 'layout' is 'strided' (a graph makes dense tensors only), got {x!r:.80}")
        return torch.strided
    if x not in ("inf", "-inf", "nan"):
        raise SpecError(f"{where}: 'float' is 'inf', '-inf' or 'nan', got {x!r:.80}")
    return float(x)


# ----------------------------------------------------------------------------- plan -> GraphModule


def build_graph(plan: GraphPlan, modules: dict[str, nn.Module]) -> fx.GraphModule:
    """Build the ``GraphModule`` of a checked plan from its built submodules (fresh attributes)."""
    root = nn.Module()
    try:
        for target in sorted(modules, key=lambda t: t.count(".")):
            _install(root, target, modules[target])
        for target, (kind, shape, dtype, rg, values) in plan.attrs.items():
            if kind == "constant":
                _install(root, target, torch.tensor(values, dtype=dtype).reshape(shape))
                continue
            value = torch.zeros(shape, dtype=dtype)
            _install(root, target, nn.Parameter(value, requires_grad=rg) if kind == "parameter" else value)
        g = fx.Graph()
        built: list[fx.Node] = []

        def resolve(a: Any) -> Any:
            if isinstance(a, _NodeRef):
                return built[a.index]
            if isinstance(a, tuple):
                return tuple(resolve(x) for x in a)
            if isinstance(a, list):
                return [resolve(x) for x in a]
            if isinstance(a, slice):
                return slice(resolve(a.start), resolve(a.stop), resolve(a.step))
            return a

        for i, (op, target, args, kwargs) in enumerate(plan.nodes):
            if op == "placeholder":
                built.append(g.placeholder(f"input_{i}", default_value=target))
            elif op == "output":
                built.append(g.output(resolve(args[0])))
            elif op == "get_attr":
                built.append(g.get_attr(target))
            else:
                args, kwargs = resolve(args), {k: resolve(v) for k, v in kwargs.items()}
                built.append(g.create_node(op, target, args, kwargs))
        g.lint()
        with warnings.catch_warnings():  # e.g. "'float' object is not subscriptable" about a graph that
            warnings.simplefilter("ignore", SyntaxWarning)  # fails when run: the run reports it
            gm = fx.GraphModule(root, g, class_name="Segment")
        for target, (kind, *_) in plan.attrs.items():  # GraphModule copies buffers as persistent ones
            if kind == "constant":
                owner, _, field = target.rpartition(".")
                gm.get_submodule(owner)._non_persistent_buffers_set.add(field)
        return gm
    except SpecError:
        raise
    except Exception as exc:  # fx refusing a graph our checks let through: still the spec's fault
        raise SpecError(f"{plan.path} (Graph): cannot build the graph: {type(exc).__name__}: {exc}") from exc


def _install(root: nn.Module, target: str, obj: nn.Module | torch.Tensor) -> None:
    *parents, field = target.split(".")
    owner = root
    for part in parents:
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    if isinstance(obj, nn.Module):
        owner.add_module(field, obj)
    elif isinstance(obj, nn.Parameter):
        owner.register_parameter(field, obj)
    else:
        owner.register_buffer(field, obj)
