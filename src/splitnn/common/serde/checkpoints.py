"""Checkpoint messages: a party's checkpoint to write or load, and what it wrote or loaded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from splitnn.common.serde.blocks import arg
from splitnn.errors import WireError

# ------------------------------------------------------------------------------------ checkpoints
#: Most segments one checkpoint command may name.
MAX_CHECKPOINT_SEGMENTS = 1024
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class CheckpointCommand(NamedTuple):
    """A party's checkpoint to write (``save_checkpoint``) or load (``load_checkpoint``): the job's id,
    the step, the segments by label (label -> key), the researcher's note (epoch, batch: numbers)
    and, to load, the sha256 the researcher's manifest records."""

    job: str
    step: int
    segments: dict[str, str]
    note: dict[str, int]
    digest: str | None = None


def checkpoint_to_args(
    job: str,
    step: int,
    segments: Mapping[str, str],
    *,
    note: Mapping[str, int] | None = None,
    digest: str | None = None,
) -> dict:
    args = {"job": job, "step": step, "segments": dict(segments), "note": dict(note or {})}
    if digest is not None:
        args["digest"] = digest
    return args


def _job(args: dict) -> str:
    job = arg(args, "job", str)
    if not 16 <= len(job) <= 128 or not set(job) <= _LABEL_CHARS - {"."}:
        raise WireError("a checkpoint job id is 16-128 characters from [A-Za-z0-9_-]")
    return job


def checkpoint_from_args(args: dict) -> CheckpointCommand:
    segments = arg(args, "segments", dict)
    if not 0 < len(segments) <= MAX_CHECKPOINT_SEGMENTS:
        raise WireError(f"a checkpoint names 1..{MAX_CHECKPOINT_SEGMENTS} segments")
    for label, key in segments.items():
        if not 0 < len(label) <= 64 or not set(label) <= _LABEL_CHARS:
            raise WireError(f"segment label {label[:70]!r} is not 1-64 characters from [A-Za-z0-9_.-]")
        if not isinstance(key, str) or not 0 < len(key) <= 256:
            raise WireError(f"segment {label!r}: its key must be a string")
    note = arg(args, "note", dict, optional=True) or {}
    if len(note) > 16 or not all(isinstance(k, str) and len(k) <= 32 for k in note):
        raise WireError("a checkpoint note holds at most 16 short names")
    for k in note:
        arg(note, k, int)
    digest = arg(args, "digest", str, optional=True)
    if digest is not None and (len(digest) != 64 or not set(digest) <= set("0123456789abcdef")):
        raise WireError("a checkpoint digest is 64 lower-case hex digits (sha256)")
    return CheckpointCommand(_job(args), arg(args, "step", int), dict(segments), dict(note), digest)


def party_checkpoint_to_result(info: Mapping[str, object]) -> dict:
    """A checkpoint a party wrote or loaded: ``{"step", "digest", "bytes"}``."""
    return {"step": info["step"], "digest": info["digest"], "bytes": info["bytes"]}


def party_checkpoint_from_result(result: dict) -> dict:
    step, nbytes = arg(result, "step", int), arg(result, "bytes", int)
    digest = arg(result, "digest", str)
    if len(digest) != 64 or not set(digest) <= set("0123456789abcdef"):
        raise WireError("a checkpoint digest is 64 lower-case hex digits (sha256)")
    return {"step": step, "digest": digest, "bytes": nbytes}
