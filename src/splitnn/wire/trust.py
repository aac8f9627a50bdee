"""What a party agrees to build from a spec: :class:`Trust`.

:class:`Trust` decides which ``{"import": "module:Name"}`` classes a party builds (its docstring gives
the rules); :func:`import_spec` describes an instance of such a class on the sending side.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splitnn.errors import SpecError, TrustError

_DEFAULT_LAYER_NAMES = """
Identity Linear Bilinear Flatten Unflatten Conv1d Conv2d Conv3d ConvTranspose1d ConvTranspose2d ConvTranspose3d
ReLU ReLU6 LeakyReLU PReLU ELU SELU CELU GELU SiLU Mish Sigmoid Tanh Softmax Softmin LogSoftmax Softplus Softsign
Softshrink Hardshrink Hardtanh Hardswish Hardsigmoid Tanhshrink LogSigmoid GLU Threshold
BatchNorm1d BatchNorm2d BatchNorm3d LayerNorm GroupNorm RMSNorm LocalResponseNorm
Dropout Dropout1d Dropout2d Dropout3d AlphaDropout
MaxPool1d MaxPool2d MaxPool3d AvgPool1d AvgPool2d AvgPool3d AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveAvgPool3d
AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d Upsample UpsamplingNearest2d UpsamplingBilinear2d
PixelShuffle PixelUnshuffle ZeroPad1d ZeroPad2d ConstantPad1d ConstantPad2d ReflectionPad1d ReflectionPad2d
ReplicationPad1d ReplicationPad2d Embedding MultiheadAttention CosineSimilarity PairwiseDistance
"""
#: The ``torch.nn`` layers every party builds without ``--trust`` (besides the spec registry).
DEFAULT_LAYERS: frozenset[type[nn.Module]] = frozenset(
    c for c in (getattr(nn, n, None) for n in _DEFAULT_LAYER_NAMES.split()) if isinstance(c, type)
)
_DEFAULT_REFS = {f"{c.__module__}:{c.__qualname__}": c for c in DEFAULT_LAYERS}

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_IMPORT = re.compile(
    r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)$"
)


@dataclass(frozen=True)
class Trust:
    """Module prefixes whose classes a party may import and build from a spec.

    ``Trust(["mypkg.models"])`` allows classes defined in ``mypkg.models`` and its submodules
    (``mypkg.models.blocks``), not ``mypkg.modelsx``. :data:`DEFAULT_LAYERS` are always allowed.

    A spec may name a class to import, ``{"import": "mypkg.models:BasicBlock", "kwargs": {...}}``,
    for layers that are neither ``torch.nn`` layers nor in the spec registry (a user's residual
    block). Importing runs that module's code, so a party imports only from module prefixes
    its operator trusts: ``splitnn worker --trust mypkg.models`` (repeatable). Lacking trust,
    decoding refuses *before anything is imported or built*, naming the class and the flag
    that would allow it.

    Trust means the class's own module. ``"module:Name"`` names one class defined at the top
    level of a module: no attribute chains (``mypkg.models:evilpkg.Dropper`` is refused before
    anything is imported), and the class found must be defined where the operator's trust
    reaches (its own ``__module__`` under a trusted prefix, its ``__qualname__`` the name sent),
    so a trusted module that imports a class from elsewhere does not lend it its trust.
    Without ``--trust``, a party builds the registry of :mod:`splitnn.wire.spec` and the
    :data:`DEFAULT_LAYERS`: a fixed list of dense ``torch.nn`` layers (``Conv1d``,
    ``LayerNorm``, ``Embedding``, ...), not everything under ``torch.nn.modules``.
    """

    modules: tuple[str, ...] = ()

    def __init__(self, modules: Iterable[str] = ()) -> None:
        mods = (modules,) if isinstance(modules, str) else tuple(modules)
        for m in mods:
            if not isinstance(m, str) or not _DOTTED.match(m):
                raise SpecError(f"a trusted module is a dotted module name like 'mypkg.models', got {m!r}")
        object.__setattr__(self, "modules", mods)

    def allows(self, module: str) -> bool:
        """Whether classes defined in ``module`` may be imported (the operator's prefixes)."""
        return any(module == p or module.startswith(p + ".") for p in self.modules)

    def resolve(self, ref: str, where: str) -> type[nn.Module]:
        """The ``nn.Module`` class named by ``ref`` (``"module:Name"``), imported only if trusted.

        Refused (:class:`TrustError`) unless ``ref`` is one of :data:`DEFAULT_LAYERS` or its module
        is under a trusted prefix (checked before importing anything), ``Name`` is one name (no
        attribute chain), and the class found is defined under a trusted prefix by that name.
        """
        module, qual = parse_import(ref, where)
        if "." in qual:
            raise TrustError(
                f"{where}: refusing {ref!r}: an import names one class at the top level of its module "
                f"('package.module:ClassName'), not an attribute chain; define the class at module level"
            )
        default = _DEFAULT_REFS.get(ref)
        if default is not None and not self.allows(module):
            return default
        if not self.allows(module):
            raise TrustError(
                f"{where}: refusing to build {module}.{qual}: module {module!r} is not trusted here (without "
                f"--trust a party builds the registered layers and splitnn.wire.trust.DEFAULT_LAYERS only). The "
                f"party's operator allows it with `splitnn worker --trust {module}` (in-process: "
                f"spec_to_module(spec, trust=Trust([{module!r}])))"
            )
        try:
            mod: Any = importlib.import_module(module)
        except Exception as exc:  # ImportError, or the trusted module failing to import
            raise SpecError(f"{where}: cannot import trusted module {module!r}: {type(exc).__name__}: {exc}") from None
        obj = vars(mod).get(qual)
        if obj is None:
            raise SpecError(f"{where}: module {module!r} has no {qual!r}")
        if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            raise SpecError(f"{where}: {module}.{qual} is not an nn.Module class")
        own = getattr(obj, "__module__", None)
        if not isinstance(own, str) or not self.allows(own) or getattr(obj, "__qualname__", None) != qual:
            raise TrustError(
                f"{where}: refusing {ref!r}: the class found is {own}.{getattr(obj, '__qualname__', '?')}, defined "
                f"outside what this party trusts (trust means the class's own module, not a module that imports "
                f"it); send it as '{own}:{getattr(obj, '__qualname__', '?')}', trusted with `splitnn worker --trust`"
            )
        return obj


def parse_import(ref: Any, where: str) -> tuple[str, str]:
    """``"mypkg.models:BasicBlock"`` -> ``("mypkg.models", "BasicBlock")``; SpecError if malformed."""
    m = _IMPORT.match(ref) if isinstance(ref, str) and len(ref) <= 256 else None
    if m is None or any(p.startswith("__") for p in ref.replace(":", ".").split(".")):
        raise SpecError(f"{where}: 'import' must be 'package.module:ClassName', got {ref!r:.100}")
    return m.group(1), m.group(2)


def json_kwargs(kwargs: Any, where: str) -> dict[str, Any]:
    """Constructor keyword arguments from JSON: identifiers as keys, JSON arrays as tuples."""
    if not isinstance(kwargs, dict):
        raise SpecError(f"{where}: 'kwargs' must be an object, got {type(kwargs).__name__}")
    for k in kwargs:
        if not k.isidentifier() or k.startswith("__"):
            raise SpecError(f"{where}: keyword argument name {k!r} is not a plain identifier")

    def conv(v: Any) -> Any:
        return tuple(conv(x) for x in v) if isinstance(v, list) else v

    for k, v in kwargs.items():
        if isinstance(v, dict):
            raise SpecError(f"{where}: kwargs.{k} is an object; kwargs hold numbers, strings, booleans, null, lists")
    return {k: conv(v) for k, v in kwargs.items()}


# ----------------------------------------------------------------------------- sending side


def import_spec(m: nn.Module, path: str) -> dict[str, Any]:
    """``{"import": "module:Qual", "kwargs": {...}}`` describing ``m``; SpecError when it cannot be told.

    On the sending side, :func:`import_spec` describes an instance of such a class: its
    constructor's keyword arguments as JSON, taken from ``module.splitnn_kwargs()`` when the
    class defines it, else from attributes named like the constructor's parameters (the way
    ``nn.Conv2d`` keeps ``in_channels``, ``stride``, ...). The description is checked by
    rebuilding the class on the ``meta`` device and comparing parameter and buffer shapes.
    """
    cls = type(m)
    module, qual = cls.__module__, cls.__qualname__
    if module == "__main__" or "<locals>" in qual:
        raise SpecError(
            f"{path}: {cls.__name__} is defined in {'a function' if '<locals>' in qual else '__main__'}, so no "
            "other party can import it; define it in an importable module (and trust that module at the "
            "workers: splitnn worker --trust ...)"
        )
    kwargs = _kwargs_of(m, cls, path)
    _check_rebuild(m, cls, kwargs, path)
    return {"import": f"{module}:{qual}", "kwargs": kwargs}


def _kwargs_of(m: nn.Module, cls: type, path: str) -> dict[str, Any]:
    hint = (
        f"define {cls.__name__}.splitnn_kwargs(self) returning its constructor's keyword arguments as JSON "
        "values, or register the type with splitnn.wire.register_layer"
    )
    custom = getattr(m, "splitnn_kwargs", None)
    if callable(custom):
        kwargs = custom()
        if not isinstance(kwargs, dict):
            raise SpecError(f"{path}: {cls.__name__}.splitnn_kwargs() must return a dict")
    else:
        kwargs = {}
        try:
            params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        except (TypeError, ValueError):
            raise SpecError(f"{path}: cannot read {cls.__name__}'s constructor; {hint}") from None
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
                continue
            if not hasattr(m, p.name):
                if p.default is not p.empty and p.name.startswith("_"):
                    continue
                raise SpecError(
                    f"{path}: cannot tell {cls.__name__}'s constructor argument {p.name!r} (no attribute "
                    f"self.{p.name}); keep it as self.{p.name} or {hint}"
                )
            value = getattr(m, p.name)
            if p.name == "bias" and (value is None or isinstance(value, torch.Tensor)):
                value = value is not None  # torch.nn layers keep the bias tensor under the flag's name
            kwargs[p.name] = value
    out = {}
    for k, v in kwargs.items():
        try:
            out[k] = _json_value(v)
        except SpecError:
            raise SpecError(f"{path}: {cls.__name__} argument {k!r} = {v!r:.60} is not a JSON value; {hint}") from None
    return out


def _json_value(v: Any) -> Any:
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if isinstance(v, float) and math.isfinite(v):
        return v
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    raise SpecError("not JSON")


def _check_rebuild(m: nn.Module, cls: type, kwargs: dict[str, Any], path: str) -> None:
    """Rebuild ``cls(**kwargs)`` on the meta device; its tensors must have ``m``'s names and shapes."""
    try:
        with torch.device("meta"):
            twin = cls(**json_kwargs(kwargs, path))
    except Exception:
        return  # cannot be built on meta: the receiver's load_state_dict checks the fit
    want = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise SpecError(
            f"{path}: {cls.__name__}(**{kwargs}) does not rebuild this module (weights differ: {diff}); define "
            f"{cls.__name__}.splitnn_kwargs(self) returning its constructor's keyword arguments"
        )


def imported_modules(spec: Any) -> set[str]:
    """The modules a (well-formed) spec imports classes from."""
    found: set[str] = set()
    stack = [spec]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            ref = v.get("import")
            if isinstance(ref, str):
                found.add(ref.partition(":")[0])
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return found
