"""The codecs' round trips at a cut, written by hand for the tests' twins (shared by the compression tests).

They share no code with :mod:`splitnn.wire.compress`: fp16/bf16 a cast there and back; int8 per row
``round((x - min) / scale)`` with ``scale = (max - min) / 255``; topk the largest magnitudes, with what was dropped
added to the next tensor of the same cut and direction (error feedback, kept in ``state``). Each takes
``(tensor, state)`` and returns what the receiver decodes.
"""

from __future__ import annotations

import math

import torch


def plain(t, state):
    return t


def cast(dtype):
    return lambda t, state: t.to(dtype).to(t.dtype)


def int8(t, state):
    rows = t.reshape(t.shape[0], -1)
    lo, hi = rows.min(dim=1).values, rows.max(dim=1).values
    scale = (hi - lo) / 255
    step = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((rows - lo[:, None]) / step[:, None]).clamp(0, 255)
    return (codes * scale[:, None] + lo[:, None]).reshape(t.shape)


def topk(ratio):
    def keep(t, state):  # error feedback: what was dropped is added to the next tensor of this cut and direction
        if state.get("residual") is not None and state["residual"].shape == t.shape:
            t = t + state["residual"]
        flat = t.reshape(-1)
        k = math.ceil(ratio * flat.numel())
        idx = torch.topk(flat.abs(), k).indices
        out = torch.zeros_like(flat)
        out[idx] = flat[idx]
        out = out.reshape(t.shape)
        state["residual"] = t - out
        return out

    return keep


fp16 = cast(torch.float16)
bf16 = cast(torch.bfloat16)

#: codec name -> its hand-written round trip (``"none"`` is left out: no codec at all)
TWIN_CODECS = {"fp16": fp16, "bf16": bf16, "int8": int8, "topk:0.25": topk(0.25)}


class AtCut(torch.autograd.Function):
    """Identity in the graph, but the value that crosses forward and the gradient that crosses back are coded."""

    @staticmethod
    def forward(ctx, x, fwd, bwd):
        ctx.bwd = bwd
        return fwd(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.bwd(g), None, None
