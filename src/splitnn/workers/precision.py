"""Mixed precision per party: a worker runs its segments' forward under ``torch.autocast``.

``VirtualWorker("bob", autocast="bf16")`` runs every segment bob hosts in bfloat16 autocast on bob's
device, whoever calls it (the forward of training and evaluation, probes, pipelined flights): the
matrix products run in bf16 while the weights, their gradients and the optimizer state stay float32,
as with ``torch.autocast`` around the unsplit model. What crosses a cut is what the segment returns
(bf16 from a matrix product). The loss, computed outside any segment, is not under autocast.

Across processes the researcher chooses per connection: ``splitnn.connect(url, ..., autocast="bf16")`` sends the
mode's name in each ``add_segment`` (one of :data:`AUTOCAST_DTYPES`, refused by name on the wire otherwise), and
the worker installs it on that segment on its own device (``add_segment(..., autocast=)``, which overrides the
party's own mode for that segment).

The autocast region is entered by a forward pre-hook and left by a forward hook that runs even when
the forward raises, so it covers every way the worker calls the module.
"""

from __future__ import annotations

import torch
from torch import nn

from splitnn.errors import ConfigurationError

__all__ = ["AUTOCAST_DTYPES", "check_autocast", "install_autocast"]

#: The autocast modes a party may run in, by name.
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_autocast(value: object, worker: str) -> torch.dtype | None:
    """The dtype of an autocast mode (``None``: full precision); ConfigurationError naming the modes."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in AUTOCAST_DTYPES:
        raise ConfigurationError(
            f"worker {worker!r}: autocast must be one of {sorted(AUTOCAST_DTYPES)} or None, got {value!r}"
        )
    return AUTOCAST_DTYPES[value]


def install_autocast(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Make every call of ``module`` run under ``torch.autocast(device.type, dtype)``."""
    regions: list[torch.autocast] = []

    def enter(mod: nn.Module, args: object) -> None:
        region = torch.autocast(device.type, dtype=dtype)
        region.__enter__()
        regions.append(region)

    def leave(mod: nn.Module, args: object, out: object) -> None:
        if regions:
            regions.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)
