"""Layer specs for the defense modules, so defended segments can travel to networked workers.

Registered with :func:`splitnn.wire.spec.register_layer` when
:mod:`splitnn.privacy` is imported:

- ``{"type": "CutNoise", "clip": C or null (no clipping), "sigma": s, "seed": n, "at_inference": b}``
- ``{"type": "NoPeek", "alpha": a, "inner": <spec of the wrapped segment>}``
- ``{"type": "LabelProtection", "strength": s, "directions": k, "seed": n}``

Arguments are validated by the constructors; a bad value raises
:class:`~splitnn.errors.SpecError` naming the layer.
"""

from __future__ import annotations

import math
from typing import Any

from splitnn.errors import ConfigurationError
from splitnn.privacy.defenses.label import LabelProtection
from splitnn.privacy.defenses.noise import CutNoise
from splitnn.privacy.defenses.nopeek import NoPeek
from splitnn.wire.spec import module_to_spec, register_layer, spec_to_module

_ARGS = {
    "CutNoise": {"clip", "sigma", "seed", "at_inference"},
    "NoPeek": {"alpha", "inner"},
    "LabelProtection": {"strength", "directions", "seed"},
}


def _checked(name: str, args: dict[str, Any]) -> dict[str, Any]:
    extra = set(args) - _ARGS[name]
    if extra:
        raise ConfigurationError(f"unexpected argument(s) {sorted(extra)}; accepted: {sorted(_ARGS[name])}")
    return args


def _cut_noise(args: dict[str, Any]) -> CutNoise:
    args = dict(_checked("CutNoise", args))
    if args.get("clip") is None:
        args["clip"] = math.inf
    return CutNoise(**args)


def _nopeek(args: dict[str, Any]) -> NoPeek:
    args = _checked("NoPeek", args)
    if "inner" not in args:
        raise ConfigurationError("NoPeek needs 'inner', the spec of the segment it wraps")
    return NoPeek(spec_to_module(args["inner"]), alpha=args.get("alpha", 0.0))


def register_defense_layers() -> None:
    """Teach the spec codec the defense layers (idempotent)."""
    register_layer(
        "CutNoise",
        CutNoise,
        lambda m: {
            "clip": None if math.isinf(m.clip) else m.clip,
            "sigma": m.sigma,
            "seed": m.seed,
            "at_inference": m.at_inference,
        },
        _cut_noise,
        param_count=lambda a: 0,
        replace=True,
    )
    register_layer(
        "NoPeek", NoPeek, lambda m: {"alpha": m.alpha, "inner": module_to_spec(m.inner)}, _nopeek, replace=True
    )
    register_layer(
        "LabelProtection",
        LabelProtection,
        lambda m: {"strength": m.strength, "directions": m.directions, "seed": m.seed},
        lambda a: LabelProtection(**_checked("LabelProtection", a)),
        param_count=lambda a: 0,
        replace=True,
    )
