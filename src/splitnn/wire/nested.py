"""Nested Python values with tensors in them, as JSON plus a flat dict of tensors (never pickle).

A torch optimizer's ``state_dict()`` is such a value: ``{"state": {0: {"momentum_buffer":
tensor, "step": tensor}}, "param_groups": [{"lr": 0.03, "betas": (0.9, 0.999), "params":
[0, 1]}]}``. :func:`encode_nested` turns it into a JSON-able value, with every tensor replaced
by a reference into a ``{name: tensor}`` dict that safetensors can store, and
:func:`decode_nested` turns them back, exactly: integer dict keys stay integers, tuples stay
tuples, ``inf``/``nan`` floats survive, tensors keep dtype, shape and values.

Only plain data is accepted (``None``, ``bool``, ``int``, ``float``, ``str``, lists, tuples,
dicts with ``str`` or ``int`` keys, tensors); anything else is a :class:`~splitnn.errors.WireError`
naming where it was found, on both sides. Decoding never imports or evaluates anything.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from splitnn.errors import WireError

__all__ = ["encode_nested", "decode_nested"]

_MAX_DEPTH = 64


def encode_nested(value: Any, *, prefix: str = "t") -> tuple[Any, dict[str, torch.Tensor]]:
    """``value`` as (JSON-able value, tensors by name); see the module docstring."""
    tensors: dict[str, torch.Tensor] = {}
    return _enc(value, tensors, prefix, "value", 0), tensors


def decode_nested(encoded: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The value :func:`encode_nested` encoded (every tensor it refers to must be in ``tensors``)."""
    return _dec(encoded, tensors, "value", 0)


def _enc(v: Any, tensors: dict[str, torch.Tensor], prefix: str, where: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise WireError(f"{where}: nested deeper than {_MAX_DEPTH} levels")
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, torch.Tensor):
        name = f"{prefix}{len(tensors)}"
        tensors[name] = v.detach().contiguous()
        return {"tensor": name}
    if isinstance(v, tuple):
        return {"tuple": [_enc(x, tensors, prefix, f"{where}[{i}]", depth + 1) for i, x in enumerate(v)]}
    if isinstance(v, list):
        return [_enc(x, tensors, prefix, f"{where}[{i}]", depth + 1) for i, x in enumerate(v)]
    if isinstance(v, dict):
        items = []
        for k, x in v.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise WireError(f"{where}: dict key {k!r} is a {type(k).__name__}; only str and int keys are kept")
            items.append([k, _enc(x, tensors, prefix, f"{where}[{k!r}]", depth + 1)])
        return {"dict": items}
    raise WireError(f"{where}: a {type(v).__name__} is not plain data (tensors, numbers, strings, lists, dicts)")


def _dec(v: Any, tensors: dict[str, torch.Tensor], where: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise WireError(f"{where}: nested deeper than {_MAX_DEPTH} levels")
    if v is None or isinstance(v, (bool, str, int, float)):
        return v
    if isinstance(v, list):
        return [_dec(x, tensors, f"{where}[{i}]", depth + 1) for i, x in enumerate(v)]
    if isinstance(v, dict) and len(v) == 1:
        ((tag, body),) = v.items()
        if tag == "tensor" and isinstance(body, str):
            if body not in tensors:
                raise WireError(f"{where}: refers to tensor {body!r}, which is missing")
            return tensors[body]
        if tag == "tuple" and isinstance(body, list):
            return tuple(_dec(x, tensors, f"{where}[{i}]", depth + 1) for i, x in enumerate(body))
        if tag == "float" and body in ("inf", "-inf", "nan"):
            return float(body)
        if tag == "dict" and isinstance(body, list):
            out: dict[Any, Any] = {}
            for item in body:
                if not (isinstance(item, list) and len(item) == 2) or isinstance(item[0], bool):
                    raise WireError(f"{where}: a dict item must be [key, value]")
                k = item[0]
                if not isinstance(k, (str, int)):
                    raise WireError(f"{where}: dict key {k!r} is neither a string nor an integer")
                out[k] = _dec(item[1], tensors, f"{where}[{k!r}]", depth + 1)
            return out
    raise WireError(f"{where}: {str(v)[:80]} is not an encoded value")
