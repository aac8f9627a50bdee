"""Building blocks of the messages: command arguments, tensor refs, tensor, state, segment and index blobs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from splitnn.checks import from_wire_fields
from splitnn.common.messages import check_party_name
from splitnn.data.batching import BatchDraw
from splitnn.errors import WireError, WorkerError
from splitnn.wire.cut_codec import decode_values, plain
from splitnn.wire.spec import spec_from_json, spec_to_json
from splitnn.wire.state_codec import decode_state, encode_state
from splitnn.wire.tensor_codec import DTYPE_CODES, decode_tensor, encode_tensor
from splitnn.workers.refs import BatchRef, TensorRef
from splitnn.workers.values import Value

#: Largest number of sources one ``forward_merged`` may merge.
MAX_MERGE_SOURCES = 256
#: Largest number of peers one session may name.
MAX_PEERS = 256
#: The longest metric list one ``metrics`` command may ask for.
MAX_METRIC_NAMES = 16
#: Largest shape a ``probe`` may ask for: dimensions, size of one dimension, elements.
MAX_PROBE_NDIM, MAX_PROBE_DIM, MAX_PROBE_ELEMENTS = 8, 1 << 20, 1 << 26
#: Stages one epoch plan may list.
MAX_PLAN_STAGES = 255
#: Named parts one ``psi_apply`` may cut the aligned rows into.
MAX_PSI_PARTS = 64
#: The longest sample id (characters) a dataset's ids may hold on the wire.
MAX_ID_CHARS = 1024
#: dtypes by the names probes of several values use (``"float32"``, ``"int64"``, ...).
DTYPE_NAMES = {str(dt).removeprefix("torch."): dt for dt in DTYPE_CODES}
#: Most segments one ``average_states`` may average, and most it may load the average into.
MAX_AVERAGE_SEGMENTS = 1024


# ---------------------------------------------------------------------------- building blocks
def arg(args: dict, key: str, kind: type | tuple, *, optional: bool = False) -> Any:
    """Command argument ``key`` of type ``kind`` (strings <= 256 chars, ints 0..2**63-1); WireError otherwise."""
    if key not in args or args[key] is None:
        if optional:
            return None
        raise WireError(f"command argument {key!r} is missing")
    value = args[key]
    if isinstance(value, bool) and kind is not bool and not (isinstance(kind, tuple) and bool in kind):
        raise WireError(f"command argument {key!r} must be {kind}, got a boolean")
    if not isinstance(value, kind):
        raise WireError(f"command argument {key!r} has the wrong type {type(value).__name__}")
    if isinstance(value, str) and len(value) > 256:
        raise WireError(f"command argument {key!r} is too long")
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value < 2**63:
        raise WireError(f"command argument {key!r} is out of range")
    return value


def blob_arg(blobs: Sequence[bytes], i: int, what: str) -> bytes:
    """Blob ``i`` of a command (``what`` names it in the error when it is missing)."""
    if i >= len(blobs):
        raise WireError(f"command is missing its {what} blob")
    return blobs[i]


def ref_to_dict(ref: TensorRef) -> dict:
    """A tensor ref as a command argument ``{owner, id}``; a fused in-process gradient cannot cross."""
    if ref.fused:
        raise WorkerError("a fused in-process gradient cannot cross the network")
    return {"owner": ref.owner, "id": ref.id}


def ref_from_dict(value: object) -> TensorRef:
    """A tensor ref ``{owner, id}`` given as an argument."""
    if not isinstance(value, dict):
        raise WireError("a tensor ref must be an object {owner, id}")
    return TensorRef(check_party_name(arg(value, "owner", str)), arg(value, "id", int))


def output_id_from_args(args: dict, *, optional: bool = False) -> int | None:
    """The id the researcher chose for the tensor a command produces (``id``)."""
    return arg(args, "id", int, optional=optional)


def tensor_to_blob(tensor: torch.Tensor) -> bytes:
    """One tensor as a blob: a validated tensor frame (dtype, shape, raw bytes)."""
    return encode_tensor(tensor)


def tensor_from_blob(blob: bytes, *, max_bytes: int) -> torch.Tensor:
    return decode_tensor(blob, max_bytes=max_bytes)


def value_to_blob(value: Value) -> bytes:
    """A tensor as a tensor blob (:func:`tensor_to_blob`), several as one values payload
    (:mod:`splitnn.wire.cut_codec`; none of them requires a gradient at the other end)."""
    if isinstance(value, torch.Tensor):
        return tensor_to_blob(value)
    return b"".join(bytes(p) for p in plain(tuple(t.detach() if t is not None else None for t in value)).wire_parts())


def value_from_blob(blob: bytes, *, several: bool, max_bytes: int) -> Value:
    """The inverse of :func:`value_to_blob`; ``several`` says which it must be (the command's ``values``)."""
    if not several:
        return tensor_from_blob(blob, max_bytes=max_bytes)
    return decode_values(blob, 0, max_bytes=max_bytes).value


def indices_to_blob(indices: torch.Tensor) -> bytes:
    """A batch's row indices as a blob: one 1-D int64 tensor."""
    return encode_tensor(indices.to(torch.int64).reshape(-1))


def indices_from_blob(blob: bytes, *, max_bytes: int) -> torch.Tensor:
    idx = decode_tensor(blob, max_bytes=max_bytes, allowed_dtypes=(torch.int64,), max_ndim=1)
    if idx.dim() != 1:
        raise WireError("batch indices must be a 1-D int64 tensor")
    return idx


def state_to_blob(state: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict (weights, gradients) as a blob: safetensors bytes, in the dict's key order."""
    return encode_state(dict(state))


def state_from_blob(blob: bytes, *, max_bytes: int) -> dict[str, torch.Tensor]:
    return decode_state(blob, max_bytes=max_bytes)


def segment_to_blobs(spec: dict, state: Mapping[str, torch.Tensor]) -> list[bytes]:
    """A segment as two blobs: its layer spec (JSON) and its weights (safetensors)."""
    return [spec_to_json(spec).encode(), encode_state({k: v.detach() for k, v in state.items()})]


def segment_from_blobs(blobs: Sequence[bytes], *, max_bytes: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(spec, state)`` of a segment; the spec is only parsed here (built by whoever trusts it)."""
    spec = spec_from_json(blob_arg(blobs, 0, "spec"))
    return spec, decode_state(blob_arg(blobs, 1, "state"), max_bytes=max_bytes)


def batch_to_command(batch: BatchRef) -> tuple[dict, list[bytes]]:
    args: dict = {"dataset": batch.dataset}
    if batch.draw is not None:  # how the rows were drawn: a data holder draws them itself from it
        args["draw"] = batch.draw.to_dict()
    return args, [indices_to_blob(batch.indices)]


def draw_from_arg(value: object) -> BatchDraw:
    """A batch's :class:`~splitnn.data.batching.BatchDraw` from its wire form, or WireError."""
    return from_wire_fields(BatchDraw, value, "a batch draw")


def batch_from_command(args: dict, blobs: Sequence[bytes], max_bytes: int) -> BatchRef:
    name = arg(args, "dataset", str)
    draw = draw_from_arg(args["draw"]) if args.get("draw") is not None else None
    return BatchRef(name, indices_from_blob(blob_arg(blobs, 0, "indices"), max_bytes=max_bytes), draw)


def ids_to_blob(ids: Sequence[str]) -> bytes:
    """A dataset's sample ids as a blob: a JSON array of strings (UTF-8)."""
    return json.dumps(list(ids), ensure_ascii=False).encode("utf-8")


def ids_from_blob(blob: bytes, *, max_bytes: int) -> list[str]:
    """The sample ids of a blob (:func:`ids_to_blob`): non-empty strings of at most :data:`MAX_ID_CHARS`;
    whether they are unique and one per row is the dataset's check."""
    if len(blob) > max_bytes:
        raise WireError(f"sample ids of {len(blob)} bytes exceed the {max_bytes}-byte limit")
    try:
        ids = json.loads(bytes(blob).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WireError("sample ids must be a JSON array of strings") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) and 0 < len(i) <= MAX_ID_CHARS for i in ids):
        raise WireError(f"sample ids must be a JSON array of non-empty strings of at most {MAX_ID_CHARS} characters")
    return ids
