"""Saving and loading a collected model as safetensors, with its declarative spec.

The file holds the weights (safetensors) and, in its metadata, the model's spec
(``splitnn.wire.spec``), so it reloads into an ``nn.Sequential`` without the
code that defined it and without unpickling anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from splitnn.errors import ConfigurationError
from splitnn.fileio import atomic_path
from splitnn.wire.spec import module_to_spec, spec_from_json, spec_to_json, spec_to_module

_SPEC_KEY = "splitnn.spec"


def save_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights and spec to ``path`` atomically (no partial file on failure)."""
    path = Path(path)
    if not path.parent.exists():
        raise ConfigurationError(f"cannot save to {path}: directory {path.parent} does not exist")
    spec = spec_to_json(module_to_spec(model))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={_SPEC_KEY: spec})
    return path


def load_model(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by :func:`save_model`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"no model file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for malformed headers
        raise ConfigurationError(
            f"{path} is not a safetensors model file ({exc}); save models with "
            f"splitnn.save_model or `splitnn train --save`"
        ) from exc
    if _SPEC_KEY not in meta:
        raise ConfigurationError(f"{path} has no splitnn model spec; it was not written by splitnn.save_model")
    model = spec_to_module(spec_from_json(meta[_SPEC_KEY]))
    model.load_state_dict(load_file(str(path)))
    return model
