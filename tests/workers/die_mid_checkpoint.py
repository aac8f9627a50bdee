"""Imported by a ``splitnn worker --data die=tests.workers.die_mid_checkpoint:tiny --trust tests.workers`` party:
the party then SIGKILLs itself half-way through writing its first checkpoint (the file half-written under its
temporary name), as an operator's ``kill -9`` or a power cut would -- a real process dying mid-write."""

from __future__ import annotations

import os
import signal

import torch

import splitnn.workers.checkpoint as _checkpoint

_save_file = _checkpoint.save_file


def _dying_save_file(tensors, filename, metadata=None):
    _save_file(tensors, filename, metadata=metadata)
    size = os.path.getsize(filename)
    with open(filename, "r+b") as f:  # what was on disk when the kill came: half the file
        f.truncate(size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


_checkpoint.save_file = _dying_save_file


def tiny() -> dict:
    return {"features": torch.zeros(4, 2)}
