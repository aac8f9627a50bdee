"""Saving and loading a collected model as safetensors, with its declarative spec.

The file holds the weights (safetensors) and, in its metadata, the model's spec
(``splitnn.wire.spec``), so it reloads without the code that defined it and
without unpickling anything: an ``nn.Sequential``, or the ``GraphModule`` that
``SplitNN.collect()`` joins from :func:`splitnn.cut`'s segments.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from splitnn.errors import ConfigurationError
from splitnn.fileio import atomic_path
from splitnn.wire.spec import module_to_spec, spec_from_json, spec_to_json, spec_to_module
from splitnn.wire.trust import Trust

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


def load_model(path: str | os.PathLike, *, trust: Trust | Iterable[str] | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_model`.

    A model with classes the spec registry does not know (a custom block kept whole by
    :func:`splitnn.cut`) names them as imports; give the modules to import them from as
    ``trust`` (e.g. ``trust=["mypkg.models"]``): a model file is data, and loading it runs
    no code you did not allow.
    """
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
    if trust is not None and not isinstance(trust, Trust):
        trust = Trust(trust)
    model = spec_to_module(spec_from_json(meta[_SPEC_KEY]), trust=trust)
    model.load_state_dict(load_file(str(path)))
    return model
