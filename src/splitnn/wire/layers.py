"""The layer registry of model specs: the layer types a spec may name, and their arguments' validators.

A registered type maps a ``{"type": NAME, ...}`` spec to a class: ``to_args`` describes a module,
``from_args`` builds one, a schema of validators checks each argument of a received spec, and
``param_count`` sizes it before anything is allocated. The built-in types (``Linear``, ``Conv2d``,
``ReLU``, ...) are registered here; :func:`register_layer` adds a user's own. :mod:`splitnn.wire.spec`
describes, checks and builds specs with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splitnn.errors import SpecError

__all__ = ["register_layer", "registered_layers", "unregister_layer"]

_MAX_STR = 256  # characters in one string
_MAX_INT = 2**31 - 1  # magnitude of any integer argument

JsonDict = dict[str, Any]

_REQUIRED = object()


class _ArgError(Exception):
    """An argument value is wrong; the caller adds which layer and argument."""


# --------------------------------------------------------------------------- validators
# Each takes a JSON value and returns the constructor value, or raises _ArgError.

Validator = Callable[[Any], Any]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int = -_MAX_INT, hi: int = _MAX_INT) -> Validator:
    def check(v: Any) -> int:
        if not _is_int(v):
            raise _ArgError(f"must be an integer, got {v!r}")
        if not lo <= v <= hi:
            raise _ArgError(f"must be between {lo} and {hi}, got {v}")
        return int(v)

    return check


def _float(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False) -> Validator:
    def check(v: Any) -> float:
        if not (isinstance(v, (int, float)) and not isinstance(v, bool)):
            raise _ArgError(f"must be a number, got {v!r}")
        f = float(v)
        if not math.isfinite(f) or f < lo or f > hi or (lo_open and f == lo):
            bound = f"({lo}" if lo_open else f"[{lo}"
            raise _ArgError(f"must be a finite number in {bound}, {hi}], got {v!r}")
        return f

    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _ArgError(f"must be true or false, got {v!r}")
    return v


def _choice(*options: str) -> Validator:
    def check(v: Any) -> str:
        if v not in options or not isinstance(v, str):
            raise _ArgError(f"must be one of {', '.join(map(repr, options))}, got {v!r}")
        return v

    return check


def _optional(inner: Validator) -> Validator:
    def check(v: Any) -> Any:
        return None if v is None else inner(v)

    return check


def _int_or_tuple(n: int, lo: int = 0, *, allow_none_items: bool = False) -> Validator:
    item = _int(lo)

    def check(v: Any) -> int | tuple[Any, ...]:
        if _is_int(v):
            return item(v)
        if isinstance(v, (list, tuple)) and len(v) == n:
            return tuple(None if (allow_none_items and x is None) else item(x) for x in v)
        raise _ArgError(f"must be an integer >= {lo} or a list of {n} such integers, got {v!r}")

    return check


def _either(*validators: Validator) -> Validator:
    def check(v: Any) -> Any:
        errors = []
        for val in validators:
            try:
                return val(v)
            except _ArgError as exc:
                errors.append(str(exc))
        raise _ArgError(" or ".join(errors))

    return check


def _int_list(min_len: int, max_len: int, lo: int) -> Validator:
    item = _int(lo)

    def check(v: Any) -> tuple[int, ...]:
        if not isinstance(v, (list, tuple)) or not min_len <= len(v) <= max_len:
            raise _ArgError(f"must be a list of {min_len} to {max_len} integers, got {v!r}")
        return tuple(item(x) for x in v)

    return check


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _LayerType:
    name: str
    cls: type[nn.Module]
    to_args: Callable[[nn.Module], JsonDict]
    from_args: Callable[[JsonDict], nn.Module]
    schema: Mapping[str, tuple[Validator, Any]] | None  # None: custom layer, from_args validates
    param_count: Callable[[JsonDict], int] | None  # from validated args; None: count on meta device
    builtin: bool


_BY_NAME: dict[str, _LayerType] = {}
_BY_CLASS: dict[type[nn.Module], _LayerType] = {}


def _register(lt: _LayerType) -> None:
    _BY_NAME[lt.name] = lt
    _BY_CLASS[lt.cls] = lt


def register_layer(
    type_name: str,
    cls: type[nn.Module],
    to_args: Callable[[nn.Module], dict[str, Any]],
    from_args: Callable[[dict[str, Any]], nn.Module] | None = None,
    *,
    param_count: Callable[[dict[str, Any]], int] | None = None,
    replace: bool = False,
) -> None:
    """Teach the spec codec a layer type.

    ``to_args(module)`` returns the module's constructor arguments as JSON values
    (numbers, strings, booleans, null, lists); ``from_args(args)`` builds a fresh module
    from them (default: ``cls(**args)``). Modules are matched by exact class.
    ``param_count(args)`` returns how many parameter + buffer elements the layer will
    allocate; without it, the count is taken by building the layer on the ``meta``
    device (no memory), falling back to a real build if that fails.
    Registering a name or class twice raises :class:`SpecError` unless ``replace=True``;
    built-in types cannot be replaced.
    """
    if not isinstance(type_name, str) or not type_name or len(type_name) > _MAX_STR:
        raise SpecError(f"layer type name must be a non-empty string, got {type_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise SpecError(f"register_layer({type_name!r}, ...): cls must be an nn.Module subclass, got {cls!r}")
    if not callable(to_args) or (from_args is not None and not callable(from_args)):
        raise SpecError(f"register_layer({type_name!r}, ...): to_args and from_args must be callables")
    conflicts = {id(e): e for e in (_BY_NAME.get(type_name), _BY_CLASS.get(cls)) if e is not None}
    for existing in conflicts.values():
        if existing.builtin:
            raise SpecError(f"layer type {existing.name!r} is built in and cannot be replaced")
    for existing in conflicts.values():
        if not replace:
            raise SpecError(
                f"layer type {existing.name!r} ({existing.cls.__qualname__}) is already registered; "
                "pass replace=True to replace it"
            )
    for existing in conflicts.values():
        unregister_layer(existing.name)
    build = from_args if from_args is not None else (lambda args: cls(**args))
    _register(_LayerType(type_name, cls, to_args, build, None, param_count, builtin=False))


def unregister_layer(type_name: str) -> None:
    """Forget a layer type added with :func:`register_layer` (built-ins stay)."""
    lt = _BY_NAME.get(type_name)
    if lt is None:
        raise SpecError(f"layer type {type_name!r} is not registered")
    if lt.builtin:
        raise SpecError(f"layer type {type_name!r} is built in and cannot be unregistered")
    del _BY_NAME[type_name]
    _BY_CLASS.pop(lt.cls, None)


def registered_layers() -> list[str]:
    """Names of every layer type the spec codec knows, built-ins first."""
    return list(_BY_NAME)


def _to_json(v: Any) -> Any:
    if isinstance(v, (tuple, list, torch.Size)):
        return [_to_json(x) for x in v]
    return v


def _builtin(
    cls: type[nn.Module],
    schema: dict[str, tuple[Validator, Any]],
    param_count: Callable[[JsonDict], int] | None = None,
    attrs: Mapping[str, Callable[[nn.Module], Any]] | None = None,
) -> None:
    getters = dict(attrs or {})

    def to_args(m: nn.Module) -> JsonDict:
        return {k: _to_json(getters[k](m) if k in getters else getattr(m, k)) for k in schema}

    def from_args(args: JsonDict) -> nn.Module:
        return cls(**args)

    _register(_LayerType(cls.__name__, cls, to_args, from_args, schema, param_count or (lambda a: 0), True))


def _has_bias(m: nn.Module) -> bool:
    return getattr(m, "bias", None) is not None


_NONNEG = _int(0)
_POS = _int(1)
_DIM = _int(-64, 64)
_INPLACE = (_bool, False)


def _linear_count(a: JsonDict) -> int:
    return a["in_features"] * a["out_features"] + (a["out_features"] if a["bias"] else 0)


def _pair(v: int | tuple[int, ...]) -> tuple[int, ...]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv_count(a: JsonDict) -> int:
    groups = a["groups"]
    for arg in ("in_channels", "out_channels"):
        if a[arg] % groups:
            raise _ArgError(f"{arg}={a[arg]} must be divisible by groups={groups}")
    if isinstance(a["padding"], str) and a["padding"] == "same" and any(s != 1 for s in _pair(a["stride"])):
        raise _ArgError("padding='same' needs stride 1")
    kh, kw = _pair(a["kernel_size"])
    return a["out_channels"] * (a["in_channels"] // groups) * kh * kw + (a["out_channels"] if a["bias"] else 0)


def _bn_count(a: JsonDict) -> int:
    n = a["num_features"]
    return (2 * n if a["affine"] else 0) + (2 * n + 1 if a["track_running_stats"] else 0)


_bias_attr = {"bias": _has_bias}

_builtin(
    nn.Linear,
    {"in_features": (_NONNEG, _REQUIRED), "out_features": (_NONNEG, _REQUIRED), "bias": (_bool, True)},
    _linear_count,
    _bias_attr,
)
_builtin(
    nn.Conv2d,
    {
        "in_channels": (_POS, _REQUIRED),
        "out_channels": (_POS, _REQUIRED),
        "kernel_size": (_int_or_tuple(2, 1), _REQUIRED),
        "stride": (_int_or_tuple(2, 1), 1),
        "padding": (_either(_int_or_tuple(2, 0), _choice("same", "valid")), 0),
        "dilation": (_int_or_tuple(2, 1), 1),
        "groups": (_POS, 1),
        "bias": (_bool, True),
        "padding_mode": (_choice("zeros", "reflect", "replicate", "circular"), "zeros"),
    },
    _conv_count,
    _bias_attr,
)
_builtin(nn.ReLU, {"inplace": _INPLACE})
_builtin(nn.LeakyReLU, {"negative_slope": (_float(), 0.01), "inplace": _INPLACE})
_builtin(nn.Sigmoid, {})
_builtin(nn.Tanh, {})
_builtin(nn.GELU, {"approximate": (_choice("none", "tanh"), "none")})
_builtin(nn.Softmax, {"dim": (_optional(_DIM), None)})
_builtin(nn.LogSoftmax, {"dim": (_optional(_DIM), None)})
_builtin(
    nn.MaxPool2d,
    {
        "kernel_size": (_int_or_tuple(2, 1), _REQUIRED),
        "stride": (_optional(_int_or_tuple(2, 1)), None),
        "padding": (_int_or_tuple(2, 0), 0),
        "dilation": (_int_or_tuple(2, 1), 1),
        "return_indices": (_bool, False),
        "ceil_mode": (_bool, False),
    },
)
_builtin(
    nn.AvgPool2d,
    {
        "kernel_size": (_int_or_tuple(2, 1), _REQUIRED),
        "stride": (_optional(_int_or_tuple(2, 1)), None),
        "padding": (_int_or_tuple(2, 0), 0),
        "ceil_mode": (_bool, False),
        "count_include_pad": (_bool, True),
        "divisor_override": (_optional(_POS), None),
    },
)
_builtin(nn.AdaptiveAvgPool2d, {"output_size": (_int_or_tuple(2, 1, allow_none_items=True), _REQUIRED)})
_builtin(nn.Flatten, {"start_dim": (_DIM, 1), "end_dim": (_DIM, -1)})
_builtin(nn.Unflatten, {"dim": (_DIM, _REQUIRED), "unflattened_size": (_int_list(1, 64, -1), _REQUIRED)})
_builtin(nn.Dropout, {"p": (_float(0.0, 1.0), 0.5), "inplace": _INPLACE})
_bn_schema = {
    "num_features": (_POS, _REQUIRED),
    "eps": (_float(0.0, lo_open=True), 1e-5),
    "momentum": (_optional(_float(0.0, 1.0)), 0.1),
    "affine": (_bool, True),
    "track_running_stats": (_bool, True),
}
_builtin(nn.BatchNorm1d, _bn_schema, _bn_count)
_builtin(nn.BatchNorm2d, _bn_schema, _bn_count)
_builtin(nn.Identity, {})

# Sequential is handled structurally: {"type": "Sequential", "layers": [...], "names": [...]}
_SEQUENTIAL = "Sequential"
