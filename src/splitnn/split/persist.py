"""Saving and loading a collected model as safetensors, with its declarative spec.

The file holds the weights (safetensors) and, in its metadata, the model's spec
(``splitnn.wire.spec``), so it reloads without the code that defined it and
without unpickling anything: an ``nn.Sequential``, or the ``GraphModule`` that
``SplitNN.collect()`` joins from :func:`splitnn.cut`'s segments.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from splitnn.errors import ConfigurationError
from splitnn.fileio import atomic_path
from splitnn.wire.spec import module_to_spec, spec_from_json, spec_to_json, spec_to_module
from splitnn.wire.trust import Trust

_SPEC_KEY = "splitnn.spec"
_SEGMENTS_KEY = "splitnn.segments"


def save_model(model: nn.Module, path: str | os.PathLike, *, segments: Sequence[int] | None = None) -> Path:
    """Write ``model``'s weights and spec to ``path`` atomically (no partial file on failure).

    ``segments``: for an ``nn.Sequential`` collected from a split network, how many of its layers
    each segment holds (e.g. ``[2, 2, 2]``), recorded so that ``splitnn fingerprint`` can print
    each segment's fingerprint.
    """
    path = Path(path)
    if not path.parent.exists():
        raise ConfigurationError(f"cannot save to {path}: directory {path.parent} does not exist")
    spec = spec_to_json(module_to_spec(model))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {_SPEC_KEY: spec}
    if segments is not None:
        sizes = [int(n) for n in segments]
        if not isinstance(model, nn.Sequential) or sum(sizes) != len(model) or any(n < 1 for n in sizes):
            raise ConfigurationError(
                f"segments={sizes} must be positive layer counts adding up to the model's {len(model)} layers "
                f"(an nn.Sequential)"
            )
        metadata[_SEGMENTS_KEY] = json.dumps(sizes)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def saved_segments(path: str | os.PathLike) -> list[int] | None:
    """How many layers each segment of a saved model holds, if the file records it (``save_model(segments=)``)."""
    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get(_SEGMENTS_KEY)
    return [int(n) for n in json.loads(text)] if text else None


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
