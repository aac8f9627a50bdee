"""Where a party computes: its torch device, checked once, and moving values onto it.

:func:`resolve_device` checks a device string when the worker is made, before anything is placed: an
unknown device, or CUDA asked for where there is none, is a :class:`~splitnn.errors.ConfigurationError`
that names the worker and the fix. :func:`to_device` moves what crosses a cut onto the receiver's device;
:func:`state_to_cpu` hands values back to the researcher on the CPU (:data:`RESEARCHER_DEVICE`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from splitnn.errors import ConfigurationError
from splitnn.workers.values import Value

__all__ = ["RESEARCHER_DEVICE", "resolve_device", "to_device", "state_to_cpu"]

#: Where tensors handed to the researcher live.
RESEARCHER_DEVICE = torch.device("cpu")

_FIX = "use device='cpu' (`splitnn worker --device cpu`)"


def resolve_device(device: str | torch.device, worker: str) -> torch.device:
    """``device`` as a checked ``torch.device`` for worker ``worker``.

    ``"cpu"`` (any index) is ``cpu``; ``"cuda"`` without an index is the current CUDA
    device, so that two workers given ``"cuda"`` and ``"cuda:0"`` compare equal.

    Raises:
        ConfigurationError: not a device string; a device type this torch does not know;
            CUDA (or another accelerator) asked for where none is available; a CUDA
            index beyond the visible GPUs. The message names the worker and the fix.
    """
    if not isinstance(device, (str, torch.device)):
        raise ConfigurationError(
            f"worker {worker!r}: device must be a string such as 'cpu' or 'cuda:0' (or a torch.device), "
            f"got {type(device).__name__} {device!r}"
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigurationError(
            f"worker {worker!r}: {str(device)!r} is not a device torch knows ({exc}); "
            "write 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from None
    if dev.type == "cpu":
        return RESEARCHER_DEVICE
    if dev.type == "meta":
        return dev
    if dev.type == "cuda":
        return _cuda(dev, device, worker)
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigurationError(
                f"worker {worker!r}: device {str(device)!r} was asked for, but MPS (Apple GPU) is not available "
                f"here; {_FIX}"
            )
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available):
        raise ConfigurationError(
            f"worker {worker!r}: device type {dev.type!r} is not supported by splitnn; "
            "use 'cpu', 'cuda', 'cuda:N' or 'mps'"
        )
    if not available():
        raise ConfigurationError(f"worker {worker!r}: device {str(device)!r} is not available here; {_FIX}")
    return dev


def _cuda(dev: torch.device, asked: object, worker: str) -> torch.device:
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this torch ({torch.__version__}) is built without CUDA"
            fix = f"{_FIX}, or install a CUDA build of torch on a machine with a GPU"
        else:
            why = "no CUDA GPU is visible to this process (check the driver and CUDA_VISIBLE_DEVICES)"
            fix = f"{_FIX}, or run this party on a machine with a GPU"
        raise ConfigurationError(f"worker {worker!r}: device {str(asked)!r} was asked for, but {why}; {fix}")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        raise ConfigurationError(
            f"worker {worker!r}: device {str(asked)!r} does not exist: {count} CUDA device(s) are visible "
            f"(cuda:0..cuda:{count - 1}); pick one of those or {_FIX}"
        )
    return torch.device("cuda", index)


def to_device(value: Value, device: torch.device) -> Value:
    """``value`` (a tensor, or a tuple of tensors and ``None``) on ``device``.

    Differentiable: a tensor attached to an autograd graph stays attached, and its
    gradient goes back to the tensor's own device. Tensors already there are returned
    as they are.

    A worker's segments, their optimizer state, its held data and its computation live on
    its device (``"cpu"`` by default; ``"cuda:0"``, ``"mps"``; ``"meta"`` holds shapes only,
    for placement checks). What crosses a cut moves to the *receiver's* device when it
    arrives: in-process with ``Tensor.to`` (differentiable, so a fused autograd graph spans
    devices and each gradient lands on its sender's device), over the network as bytes from
    the CPU (:mod:`splitnn.wire.tensor_codec` copies device tensors to the CPU before
    encoding; the receiving worker moves what it decodes onto its device). A transfer moves
    ``numel * element_size`` bytes whatever the devices, so the ledger is the same.
    """
    if type(value) is tuple:
        return tuple(None if t is None else t.to(device) for t in value)
    return value.to(device)


def state_to_cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a state dict's tensors (never aliases of the worker's own)."""
    return {k: v.detach().to(RESEARCHER_DEVICE, copy=True) for k, v in state.items()}
