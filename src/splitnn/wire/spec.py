"""Declarative model specs: a model travels as JSON naming known layer types, never as code.

:func:`module_to_spec` describes a module; :func:`spec_to_module` checks a spec and builds fresh layers
(its docstring gives the format and the checks); weights travel separately as a state dict
(:mod:`splitnn.wire.state_codec`).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from splitnn.errors import SpecError
from splitnn.wire.graph import GRAPH_TYPE, GraphPlan, build_graph, describe_graph, plan_graph
from splitnn.wire.layers import (
    _BY_CLASS,
    _BY_NAME,
    _MAX_STR,
    _REQUIRED,
    _SEQUENTIAL,
    JsonDict,
    _ArgError,
    _is_int,
    _LayerType,
    _to_json,
    register_layer,
    registered_layers,
    unregister_layer,
)
from splitnn.wire.trust import Trust, import_spec, json_kwargs, parse_import

__all__ = [
    "DEFAULT_MAX_PARAMS",
    "MAX_SPEC_DEPTH",
    "MAX_SPEC_LAYERS",
    "module_to_spec",
    "spec_to_module",
    "spec_param_count",
    "validate_spec",
    "spec_to_json",
    "spec_from_json",
    "canonical_spec",
    "register_layer",
    "unregister_layer",
    "registered_layers",
    "Trust",
]

#: Most parameter + buffer elements :func:`spec_to_module` builds unless told otherwise.
DEFAULT_MAX_PARAMS: int = 100_000_000
#: Deepest JSON nesting a spec may have.
MAX_SPEC_DEPTH: int = 32
#: Most layers (Sequential containers included) a spec may describe.
MAX_SPEC_LAYERS: int = 1024
_MAX_NODES = 100_000  # JSON values in one spec
_MAX_LIST = 4096  # items in one list
_MAX_JSON_CHARS = 4_000_000  # characters of spec JSON text


# --------------------------------------------------------------------------- module -> spec


def _hint_register(what: str) -> str:
    return (
        f"register it with splitnn.wire.register_layer({what!r}, cls, to_args=lambda m: {{...}}, "
        "from_args=lambda args: cls(**args)), or define the segment locally at the worker"
    )


def module_to_spec(m: nn.Module) -> JsonDict:
    """Describe ``m`` as a JSON-serialisable spec (no weights).

    Registered layer types and ``nn.Sequential`` are described by type; a
    ``torch.fx.GraphModule`` by its graph; any other class as an import of that class
    with its constructor's keyword arguments (see :func:`splitnn.wire.trust.import_spec`),
    which a receiver builds only if it trusts the class's module.
    Raises :class:`SpecError` for a module that cannot be described that way.
    """
    spec = _describe(m, "spec")
    validate_spec(spec)  # what we send must pass the receiver's checks
    return spec


def _describe(m: nn.Module, path: str) -> JsonDict:
    if not isinstance(m, nn.Module):
        raise SpecError(f"{path}: expected an nn.Module, got {type(m).__name__}")
    cls = type(m)
    if cls is nn.Sequential:
        names = list(m._modules.keys())
        children = list(m._modules.values())
        layers = []
        for i, child in enumerate(children):
            if child is None:
                raise SpecError(f"{path}.layers[{i}]: Sequential child {names[i]!r} is None")
            layers.append(_describe(child, f"{path}.layers[{i}]"))
        spec: JsonDict = {"type": _SEQUENTIAL, "layers": layers}
        if names != [str(i) for i in range(len(names))]:
            spec["names"] = names
        return spec
    lt = _BY_CLASS.get(cls)
    if lt is None and isinstance(m, fx.GraphModule):
        return describe_graph(m, path, _describe)
    if lt is None:
        try:
            return import_spec(m, path)
        except SpecError as exc:
            qual = f"{cls.__module__}.{cls.__qualname__}"
            raise SpecError(
                f"cannot describe a module of type {qual}: no layer type is registered for it, and {exc}; "
                "or " + _hint_register(cls.__name__)
            ) from None
    try:
        args = lt.to_args(m)
    except Exception as exc:
        raise SpecError(f"{path}: to_args of layer type {lt.name!r} failed: {exc}") from exc
    if not isinstance(args, dict):
        raise SpecError(f"{path}: to_args of layer type {lt.name!r} must return a dict, got {type(args).__name__}")
    if "type" in args:
        raise SpecError(f"{path}: layer type {lt.name!r} may not use an argument named 'type'")
    args = {k: _to_json(v) for k, v in args.items()}
    return {"type": lt.name, **args}


# --------------------------------------------------------------------------- spec checks


def _check_plain_json(spec: Any) -> None:
    """Spec must be plain JSON data of bounded size and nesting (checked iteratively)."""
    stack: list[tuple[Any, int, str]] = [(spec, 1, "spec")]
    nodes = 0
    while stack:
        v, depth, path = stack.pop()
        nodes += 1
        if nodes > _MAX_NODES:
            raise SpecError(f"spec is too large: more than {_MAX_NODES} JSON values")
        if depth > MAX_SPEC_DEPTH:
            raise SpecError(f"{path}: spec nests deeper than {MAX_SPEC_DEPTH} levels")
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, int):
            if abs(v) > 2**63:
                raise SpecError(f"{path}: integer {v} is out of range")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise SpecError(f"{path}: {v!r} is not a finite number")
        elif isinstance(v, str):
            if len(v) > _MAX_STR:
                raise SpecError(f"{path}: string longer than {_MAX_STR} characters")
        elif isinstance(v, list):
            if len(v) > _MAX_LIST:
                raise SpecError(f"{path}: list longer than {_MAX_LIST} items")
            stack.extend((x, depth + 1, f"{path}[{i}]") for i, x in enumerate(v))
        elif isinstance(v, dict):
            if len(v) > _MAX_LIST:
                raise SpecError(f"{path}: object with more than {_MAX_LIST} keys")
            for k, x in v.items():
                if not isinstance(k, str):
                    raise SpecError(f"{path}: object keys must be strings, got {k!r}")
                if len(k) > _MAX_STR:
                    raise SpecError(f"{path}: key longer than {_MAX_STR} characters")
                stack.append((x, depth + 1, f"{path}.{k}"))
        else:
            raise SpecError(
                f"{path}: {type(v).__name__} is not a JSON value; specs hold only "
                "numbers, strings, booleans, null, lists and objects"
            )


@dataclass
class _Plan:
    """A validated layer, ready to build."""

    lt: _LayerType | None  # None: Sequential, graph or import
    args: JsonDict
    children: list[_Plan]
    names: list[str] | None
    path: str
    graph: GraphPlan | None = None
    cls: type[nn.Module] | None = None  # an import, resolved (None while only validating)


def _plan(spec: Any, path: str, counter: list[int], trust: Trust | None = None) -> _Plan:
    """Check ``spec``. With ``trust`` None only its form is checked and nothing is imported
    (``validate_spec``); else imports are checked against ``trust`` and resolved."""
    counter[0] += 1
    if counter[0] > MAX_SPEC_LAYERS:
        raise SpecError(f"spec describes more than {MAX_SPEC_LAYERS} layers")
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: a layer must be a JSON object with a 'type', got {type(spec).__name__}")
    if "import" in spec:
        extra = set(spec) - {"import", "kwargs"}
        if extra:
            raise SpecError(f"{path} (import): unexpected key(s) {sorted(extra)}; expected 'import' and 'kwargs'")
        kwargs = json_kwargs(spec.get("kwargs", {}), f"{path} (import)")
        parse_import(spec["import"], path)
        cls = trust.resolve(spec["import"], path) if trust is not None else None
        return _Plan(None, kwargs, [], None, path, cls=cls)
    type_name = spec.get("type")
    if type_name == GRAPH_TYPE:
        graph = plan_graph(spec, path, lambda sub, where: _plan(sub, where, counter, trust))
        return _Plan(None, {}, [], None, path, graph=graph)
    if not isinstance(type_name, str):
        raise SpecError(f"{path}: a layer needs a string 'type', got {type_name!r}")
    raw = {k: v for k, v in spec.items() if k != "type"}
    if type_name == _SEQUENTIAL:
        extra = set(raw) - {"layers", "names"}
        if extra:
            raise SpecError(
                f"{path} (Sequential): unexpected argument(s) {sorted(extra)}; expected 'layers' and optional 'names'"
            )
        layers = raw.get("layers")
        if not isinstance(layers, list):
            raise SpecError(f"{path} (Sequential): argument 'layers' must be a list of layers, got {layers!r}")
        names = raw.get("names")
        if names is not None:
            if not isinstance(names, list) or len(names) != len(layers):
                raise SpecError(f"{path} (Sequential): argument 'names' must be a list of {len(layers)} strings")
            for n in names:
                if not isinstance(n, str) or not n or "." in n:
                    raise SpecError(
                        f"{path} (Sequential): argument 'names' holds {n!r}; names are non-empty strings without '.'"
                    )
            if len(set(names)) != len(names):
                raise SpecError(f"{path} (Sequential): argument 'names' holds duplicates")
        children = [_plan(c, f"{path}.layers[{i}]", counter, trust) for i, c in enumerate(layers)]
        return _Plan(None, {}, children, names, path)
    lt = _BY_NAME.get(type_name)
    if lt is None:
        known = ", ".join(registered_layers() + [_SEQUENTIAL])
        raise SpecError(f"{path}: unknown layer type {type_name!r} (known: {known}); " + _hint_register(type_name))
    where = f"{path} ({type_name})"
    if lt.schema is None:
        return _Plan(lt, raw, [], None, path)
    extra = set(raw) - set(lt.schema)
    if extra:
        raise SpecError(f"{where}: unexpected argument {sorted(extra)[0]!r}; accepted: {sorted(lt.schema)}")
    args: JsonDict = {}
    for name, (check, default) in lt.schema.items():
        if name not in raw:
            if default is _REQUIRED:
                raise SpecError(f"{where}: missing required argument {name!r}")
            args[name] = default
            continue
        try:
            args[name] = check(raw[name])
        except _ArgError as exc:
            raise SpecError(f"{where}: argument {name!r} {exc}") from None
    return _Plan(lt, args, [], None, path)


def _count_params(plan: _Plan) -> int:
    if plan.graph is not None:
        return plan.graph.attr_elements() + sum(max(_count_params(p), 0) for p in plan.graph.modules.values())
    if plan.cls is not None:
        try:  # trusted code, built on the meta device: allocates nothing
            with torch.device("meta"):
                mod = plan.cls(**plan.args)
        except Exception:
            return -1  # unknown before building; checked after the real build
        return _module_elements(mod) if isinstance(mod, nn.Module) else -1
    if plan.lt is None:
        return sum(_count_params(c) for c in plan.children)
    where = f"{plan.path} ({plan.lt.name})"
    if plan.lt.param_count is not None:
        try:
            n = plan.lt.param_count(plan.args)
        except _ArgError as exc:
            raise SpecError(f"{where}: {exc}") from None
        except Exception as exc:
            raise SpecError(f"{where}: cannot count parameters: {exc}") from exc
        if not _is_int(n) or n < 0:
            raise SpecError(f"{where}: param_count returned {n!r}, expected a non-negative integer")
        return n
    try:  # custom layer without a param_count: build on the meta device, which allocates nothing
        with torch.device("meta"):
            mod = plan.lt.from_args(dict(plan.args))
    except Exception:
        return -1  # unknown before building; checked after the real build
    return _module_elements(mod)


def _module_elements(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters()) + sum(b.numel() for b in mod.buffers())


def validate_spec(spec: Any) -> None:
    """Check that ``spec`` is well formed (plain JSON, bounded, known types, valid arguments).

    Builds and imports nothing (whether an imported class is trusted is the builder's
    check, :func:`spec_to_module`). Raises :class:`SpecError` naming the first problem.
    """
    _check_plain_json(spec)
    _plan(spec, "spec", [0])


def spec_param_count(spec: Any, *, trust: Trust | None = None) -> int:
    """Number of parameter + buffer elements the model described by ``spec`` will hold.

    Computed from the arguments, before allocating anything (custom layers without a
    ``param_count`` and imported classes are measured on the ``meta`` device; one that
    cannot be built there counts as 0 here). Imports must be allowed by ``trust``
    (default: :data:`~splitnn.wire.trust.DEFAULT_LAYERS` only). Raises :class:`SpecError`.
    """
    _check_plain_json(spec)
    return _sum_known(_plan(spec, "spec", [0], trust or Trust()))


def spec_to_module(spec: Any, *, max_params: int = DEFAULT_MAX_PARAMS, trust: Trust | None = None) -> nn.Module:
    """Build a fresh module (new random weights) from a spec made by :func:`module_to_spec`.

    Validates the whole spec -- every import against ``trust`` (default: the registry
    and :data:`~splitnn.wire.trust.DEFAULT_LAYERS` only) -- and checks that its parameter + buffer element count
    is at most ``max_params`` before allocating. Load the weights with ``load_state_dict``.
    Raises :class:`SpecError` naming the layer and argument at fault
    (:class:`~splitnn.errors.TrustError` for an untrusted class, naming it and the flag).

    A spec is a JSON object with a ``"type"`` key naming a registered layer type
    (:mod:`splitnn.wire.layers`) and that type's constructor arguments beside it::

        {"type": "Sequential", "layers": [
            {"type": "Linear", "in_features": 784, "out_features": 128, "bias": true},
            {"type": "ReLU", "inplace": false}]}

    ``Sequential`` may carry ``"names"`` when its children are not named ``0, 1, ...``, so
    that state-dict keys match. :func:`spec_to_module` builds fresh layers; weights travel
    separately as a state dict (see :mod:`splitnn.wire.state_codec`).

    Two more kinds of spec:

    * ``{"type": "Graph", ...}``: a ``torch.fx.GraphModule`` (a segment made by
      :func:`splitnn.cut`) as its graph of allow-listed ops; see :mod:`splitnn.wire.graph`.
    * ``{"import": "mypkg.models:BasicBlock", "kwargs": {...}}``: a class that is neither
      registered nor a graph, built by importing it -- only from modules the receiver trusts
      (:class:`~splitnn.wire.trust.Trust`; the registry and a fixed list of ``torch.nn`` layers
      are trusted by default).

    Specs from other parties are untrusted. :func:`spec_to_module` first checks that the
    spec is plain JSON data of bounded size and nesting, validates every layer's
    arguments, and adds up the parameter and buffer elements the model would allocate
    *before* building anything. Every problem raises :class:`SpecError` naming the layer
    (by its path, e.g. ``spec.layers[2]``), and the argument.
    """
    _check_plain_json(spec)
    plan = _plan(spec, "spec", [0], trust or Trust())
    total = _sum_known(plan)
    if total > max_params:
        raise SpecError(
            f"spec describes {total} parameter and buffer elements; the limit is {max_params} "
            "(pass max_params= to spec_to_module to raise it)"
        )
    module = _build(plan)
    real = _module_elements(module)
    if real > max_params:  # custom layers that could not be measured before building
        raise SpecError(
            f"spec built {real} parameter and buffer elements; the limit is {max_params} "
            "(pass max_params= to spec_to_module to raise it)"
        )
    return module


def _sum_known(plan: _Plan) -> int:
    if plan.lt is None and plan.graph is None and plan.cls is None:
        return sum(_sum_known(c) for c in plan.children)
    return max(_count_params(plan), 0)


def _build(plan: _Plan) -> nn.Module:
    if plan.graph is not None:
        return build_graph(plan.graph, {t: _build(p) for t, p in plan.graph.modules.items()})
    if plan.cls is not None:
        try:
            mod = plan.cls(**plan.args)
        except Exception as exc:
            raise SpecError(f"{plan.path}: cannot build {plan.cls.__qualname__}(**{plan.args}): {exc}") from exc
        if not isinstance(mod, nn.Module):
            raise SpecError(f"{plan.path}: {plan.cls.__qualname__}(...) did not return an nn.Module")
        return mod
    if plan.lt is None:
        children = [_build(c) for c in plan.children]
        if plan.names is None:
            return nn.Sequential(*children)
        return nn.Sequential(OrderedDict(zip(plan.names, children)))
    lt = plan.lt
    try:
        mod = lt.from_args(dict(plan.args))
    except Exception as exc:
        raise SpecError(f"{plan.path} ({lt.name}): cannot build the layer from arguments {plan.args}: {exc}") from exc
    if not isinstance(mod, nn.Module):
        raise SpecError(f"{plan.path} ({lt.name}): from_args returned {type(mod).__name__}, not an nn.Module")
    return mod


# --------------------------------------------------------------------------- JSON text


def spec_to_json(spec: JsonDict) -> str:
    """Serialise a spec to compact JSON text (validated first; raises :class:`SpecError`)."""
    validate_spec(spec)
    return json.dumps(spec, separators=(",", ":"), allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise SpecError(f"spec JSON holds {name}, which is not a finite number")


def _parse_float(text: str) -> float:
    f = float(text)
    if not math.isfinite(f):
        raise SpecError(f"spec JSON number {text[:40]} is out of range")
    return f


def spec_from_json(text: str | bytes, *, max_chars: int = _MAX_JSON_CHARS) -> JsonDict:
    """Parse spec JSON text and validate it (raises :class:`SpecError`; builds nothing)."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError(f"spec JSON is not UTF-8: {exc}") from None
    if not isinstance(text, str):
        raise SpecError(f"spec JSON must be str or bytes, got {type(text).__name__}")
    if len(text) > max_chars:
        raise SpecError(f"spec JSON is {len(text)} characters; the limit is {max_chars}")
    try:
        spec = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float)
    except SpecError:
        raise
    except (ValueError, RecursionError) as exc:
        raise SpecError(f"spec is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise SpecError(f"spec JSON must be an object, got {type(spec).__name__}")
    validate_spec(spec)
    return spec


# --------------------------------------------------------------------------- canonical form


def canonical_spec(spec: Any) -> JsonDict:
    """The canonical form of a valid spec: what two specs of the same computation share.

    The basis of a segment's fingerprint (:mod:`splitnn.wire.fingerprint`). Registered layers
    get every argument, defaults filled in; ``Sequential`` containers are flattened (a
    ``Sequential`` inside a ``Sequential`` runs its layers in the same order) and lose their
    child names (names choose state-dict keys, not what runs); a spec that is not a
    ``Sequential`` becomes a ``Sequential`` of one layer. Graphs keep their nodes, with each
    submodule in canonical form; imports keep their class and arguments. Keys are sorted when
    the result is serialised (:func:`canonical_json`). Raises :class:`SpecError` for an invalid spec.
    """
    validate_spec(spec)
    layers = _canonical(spec)
    return {"type": _SEQUENTIAL, "layers": layers["layers"] if layers.get("type") == _SEQUENTIAL else [layers]}


def canonical_json(spec: Any) -> str:
    """:func:`canonical_spec` as compact JSON text with sorted keys (ASCII only)."""
    return json.dumps(canonical_spec(spec), sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def _canonical(spec: JsonDict) -> JsonDict:
    if "import" in spec:
        return {"import": spec["import"], "kwargs": spec.get("kwargs", {})}
    type_name = spec["type"]
    if type_name == GRAPH_TYPE:
        out = dict(spec)
        out["modules"] = {k: _canonical(v) for k, v in spec.get("modules", {}).items()}
        return out
    if type_name == _SEQUENTIAL:
        flat: list[JsonDict] = []
        for child in spec["layers"]:
            c = _canonical(child)
            flat.extend(c["layers"] if c.get("type") == _SEQUENTIAL else [c])
        return {"type": _SEQUENTIAL, "layers": flat}
    lt = _BY_NAME[type_name]
    raw = {k: v for k, v in spec.items() if k != "type"}
    if lt.schema is None:
        return {"type": type_name, **raw}
    # validated values: the validators coerce (an integer dropout ``p`` becomes a float)
    args = {
        name: _to_json(check(raw[name]) if name in raw else default) for name, (check, default) in lt.schema.items()
    }
    return {"type": type_name, **args}
