"""What crosses a cut: one tensor, or a tuple of tensors when several values cross it.

A segment cut in the middle of a residual block returns a tuple (see :func:`splitnn.cut`) and the next
segment takes its items as positional arguments; one value stays a plain tensor. :func:`check_values`
checks a value, :func:`nbytes` counts its bytes as the ledger does.

Gradients. A value crosses back (its gradient is sent) only if it requires a gradient
at the sender: an integer tensor, a mask or anything computed from data alone crosses
forward only. The gradient of a tuple is a tuple of the same length, ``None`` where no
gradient flows (a value that does not need one, or that the receiver did not use
differentiably).
"""

from __future__ import annotations

import torch

from splitnn.errors import WorkerError
from splitnn.wire.tensor_codec import tensor_nbytes
from splitnn.workers.refs import ValueShape

#: A value at a cut: one tensor, or a tuple of them (``None`` entries only in gradients).
Value = torch.Tensor | tuple[torch.Tensor | None, ...]

#: How a probe describes a value: a shape for one tensor, one ValueShape per tensor for several.
ProbeShape = tuple[int, ...] | tuple[ValueShape, ...]


def nbytes(value: Value) -> int:
    """Bytes a transfer of ``value`` moves (``None`` entries move nothing).

    Accounting. One crossing of a cut is one ledger record whose bytes are the sum of the
    tensors that cross (``None`` entries move nothing); a gradient tuple in which no tensor
    flows is not recorded at all, in the fused and the eager path alike.
    """
    if type(value) is tuple:
        return sum(tensor_nbytes(t) for t in value if t is not None)
    return tensor_nbytes(value)


def check_values(out: object, where: str) -> Value:
    """``out`` if it is a tensor or a tuple (or list) of tensors; else a WorkerError naming ``where``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        for i, t in enumerate(out):
            if not isinstance(t, torch.Tensor):
                raise WorkerError(
                    f"{where} returned a {type(t).__name__} as value {i} of its output; only tensors can cross a "
                    "cut (compute it after the cut, or make it a tensor)"
                )
        return tuple(out)
    raise WorkerError(f"{where} returned a {type(out).__name__}; a segment returns a tensor or a tuple of tensors")


def describe(value: Value) -> ProbeShape:
    """A probe's description of ``value``."""
    if type(value) is tuple:
        return tuple(ValueShape(tuple(t.shape), t.dtype) for t in value)
    return tuple(value.shape)


def zeros_for(shape: ProbeShape) -> Value:
    """Zeros matching a probe's description (float32 for a bare shape)."""
    if shape and all(isinstance(s, ValueShape) for s in shape):
        return tuple(torch.zeros(s.shape, dtype=s.dtype) for s in shape)
    return torch.zeros(shape)


def is_several(shape: ProbeShape) -> bool:
    """Whether a probe's description is of several values."""
    return bool(shape) and isinstance(shape[0], ValueShape)
