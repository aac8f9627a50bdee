"""Private set intersection's messages; each PSI message itself is pulled by its receiver over the peer stream."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from splitnn.common.serde.blocks import (
    MAX_PSI_PARTS,
    arg,
    indices_from_blob,
    indices_to_blob,
)
from splitnn.errors import WireError


# --------------------------------------------------------------------- private set intersection
# The rounds are splitnn.training.psi's; a message is a 1-D uint8 tensor that its receiver pulls from
# its sender over their peer stream (kind ``psi``), never through the researcher.
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
