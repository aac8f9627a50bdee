"""The training step's messages: put, forward, loss, backward (merged too), weights hand-off and fetch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from splitnn.common.serde.blocks import (
    arg,
    batch_from_command,
    batch_to_command,
    blob_arg,
    output_id_from_args,
    ref_from_dict,
    ref_to_dict,
    value_from_blob,
    value_to_blob,
    values_count,
)
from splitnn.common.serde.setup import key_from_args
from splitnn.errors import WireError
from splitnn.workers.refs import BatchRef, LossStats, TensorRef
from splitnn.workers.values import Value


# ----------------------------------------------------------------------------- the training step
def put_to_command(tid: int, kind: str, value: Value) -> tuple[dict, list[bytes]]:
    """Put a tensor the researcher gives (``kind``: ``features``) at the worker as tensor ``tid``; a tuple
    (a model that takes several inputs) travels as one values blob, ``values`` counting them."""
    args: dict = {"id": tid, "kind": kind}
    if not isinstance(value, torch.Tensor):
        args["values"] = len(value)
    return args, [value_to_blob(value)]


def put_from_args(args: dict) -> tuple[int, str, bool]:
    """``(tid, kind, several)``; the value is ``value_from_blob(blobs[0], several=several)`` (decoded once the
    id is announced)."""
    return output_id_from_args(args), arg(args, "kind", str), values_count(args)


def forward_to_command(key: str, source: TensorRef | BatchRef, tid: int, *, train: bool) -> tuple[dict, list[bytes]]:
    """Run segment ``key`` on a local batch or another party's activation; the output is tensor ``tid``."""
    if isinstance(source, BatchRef):
        src, blobs = batch_to_command(source)
    else:
        src, blobs = ref_to_dict(source), []
    return {"key": key, "train": train, "id": tid, "src": src}, blobs


def forward_from_command(
    args: dict, blobs: Sequence[bytes], *, max_bytes: int
) -> tuple[str, TensorRef | BatchRef, bool]:
    """``(key, source, train)`` (the output's id: :func:`output_id_from_args`)."""
    key, train = key_from_args(args), arg(args, "train", bool)
    src = arg(args, "src", dict)
    source = batch_from_command(src, blobs, max_bytes) if "dataset" in src else ref_from_dict(src)
    return key, source, train


def loss_to_command(
    output: TensorRef, target: BatchRef, loss: str, *, train: bool, keep: str | None = None
) -> tuple[dict, list[bytes]]:
    """Score ``output`` against the labels of ``target``; ``keep`` names an evaluation kept for its metrics."""
    args, blobs = batch_to_command(target)
    args.update({"output": ref_to_dict(output), "loss": loss, "train": train})
    if keep is not None:
        args["keep"] = keep
    return args, blobs


class LossCommand(NamedTuple):
    output: TensorRef
    target: BatchRef
    loss: str
    train: bool
    keep: str | None


def loss_from_command(args: dict, blobs: Sequence[bytes], *, max_bytes: int) -> LossCommand:
    output = ref_from_dict(arg(args, "output", dict))
    loss, train = arg(args, "loss", str), arg(args, "train", bool)
    keep = arg(args, "keep", str, optional=True)
    return LossCommand(output, batch_from_command(args, blobs, max_bytes), loss, train, keep)


def loss_stats_to_result(stats: LossStats) -> dict:
    """One batch's loss, correct count and size (the ``loss`` reply)."""
    return {"loss": stats.loss, "correct": stats.correct, "count": stats.count}


def loss_stats_from_result(result: dict) -> LossStats:
    try:
        return LossStats(float(result["loss"]), int(result["correct"]), int(result["count"]))
    except (KeyError, TypeError, ValueError, OverflowError):  # int(inf) overflows
        raise WireError("loss: the reply must hold 'loss', 'correct' and 'count'") from None


# ------------------------------------------------------------------------------------ outputs
def fetch_to_args(ref: TensorRef, kind: str) -> dict:
    """Hand tensor ``ref`` to the researcher, recorded as ``kind`` (the reply: :func:`tensor_to_blob`)."""
    return {"ref": ref_to_dict(ref), "kind": kind}


def fetch_from_args(args: dict) -> tuple[TensorRef, str]:
    return ref_from_dict(arg(args, "ref", dict)), arg(args, "kind", str)


def fetch_to_result(value: Value) -> tuple[dict, list[bytes]]:
    """The fetched tensor (or tuple of them: ``values`` counts them) as the ``fetch`` reply."""
    return ({} if isinstance(value, torch.Tensor) else {"values": len(value)}), [value_to_blob(value)]


def fetch_from_result(result: dict, blobs: Sequence[bytes], *, max_bytes: int) -> Value:
    several = values_count(result)
    return value_from_blob(blob_arg(blobs, 0, "tensor"), several=several, max_bytes=max_bytes)
