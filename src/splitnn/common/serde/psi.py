"""Private set intersection's messages; each PSI message itself is pulled by its receiver over the peer stream."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from splitnn.common.serde.blocks import (
    MAX_PSI_PARTS,
    arg,
    indices_from_blob,
    indices_to_blob,
    ref_from_dict,
    ref_to_dict,
)
from splitnn.errors import WireError
from splitnn.workers.refs import TensorRef


# --------------------------------------------------------------------- private set intersection
# The rounds are splitnn.training.psi's; a message is a 1-D uint8 tensor that its receiver pulls from
# its sender over their peer stream (kind ``psi``), never through the researcher.
def psi_request_to_args(session: str, dataset: str, tid: int) -> dict:
    """Open PSI ``session`` as the client over ``dataset``'s candidate ids; the request is tensor ``tid``."""
    return {"session": session, "dataset": dataset, "id": tid}


def psi_request_from_args(args: dict) -> tuple[str, str]:
    """``(session, dataset)`` (the request's id: :func:`output_id_from_args`)."""
    return arg(args, "session", str), arg(args, "dataset", str)


def psi_reply_to_args(dataset: str, request: TensorRef, tid: int) -> dict:
    """Answer the client's ``request`` as the PSI server over ``dataset``'s candidate ids; the reply is tensor
    ``tid``."""
    return {"dataset": dataset, "src": ref_to_dict(request), "id": tid}


def psi_reply_from_args(args: dict) -> tuple[str, TensorRef]:
    """``(dataset, request)`` (the reply's id: :func:`output_id_from_args`)."""
    return arg(args, "dataset", str), ref_from_dict(arg(args, "src", dict))


def psi_finish_to_args(session: str, reply: TensorRef) -> dict:
    """Narrow the candidates of PSI ``session``'s dataset with the server's ``reply``."""
    return {"session": session, "src": ref_to_dict(reply)}


def psi_finish_from_args(args: dict) -> tuple[str, TensorRef]:
    return arg(args, "session", str), ref_from_dict(arg(args, "src", dict))


def psi_apply_to_command(dataset: str, parts: Mapping[str, torch.Tensor]) -> tuple[dict, list[bytes]]:
    """Keep the intersected rows of ``dataset``; hold each of ``parts`` (name -> positions in the aligned
    order) as a dataset too: the names in the arguments, one indices blob per part."""
    return {"dataset": dataset, "parts": list(parts)}, [indices_to_blob(idx) for idx in parts.values()]


def psi_apply_from_command(
    args: dict, blobs: Sequence[bytes], *, max_bytes: int
) -> tuple[str, dict[str, torch.Tensor]]:
    """``(dataset, parts)``; whether the positions fit the intersection is the worker's check."""
    dataset = arg(args, "dataset", str)
    names = arg(args, "parts", list)
    if (
        len(names) > MAX_PSI_PARTS
        or not all(isinstance(n, str) and 0 < len(n) <= 256 for n in names)
        or len(set(names)) != len(names)
    ):
        raise WireError(f"psi_apply: 'parts' must list at most {MAX_PSI_PARTS} distinct dataset names")
    if len(blobs) != len(names):
        raise WireError(f"psi_apply: {len(blobs)} index blobs for {len(names)} parts")
    return dataset, {n: indices_from_blob(b, max_bytes=max_bytes) for n, b in zip(names, blobs)}
