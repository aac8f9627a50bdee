"""``splitnn fingerprint``: print the fingerprints of a saved model's segments, for a party's policy.

    splitnn fingerprint model.safetensors [--segments 2,2,2] [--trust mypkg.models] [--json]

A fingerprint is the sha256 of a segment's canonical spec (:mod:`splitnn.wire.fingerprint`):
it names an architecture, not its weights. A party pins the ones it approves in its policy
(``accept_segments`` in ``splitnn worker --policy policy.toml``). The file's segments are
those ``splitnn train --save`` recorded, or ``--segments`` (layers per segment, for an
``nn.Sequential`` model); the fingerprint of the whole model is printed too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from splitnn.cli.format import parse_positive_ints, table
from splitnn.errors import ConfigurationError

HELP = "print a saved model's segment fingerprints (for a party's policy: accept_segments)"
DESCRIPTION = (
    "Print the fingerprint (sha256 of the canonical spec) of each segment of a model saved with "
    "splitnn.save_model or `splitnn train --save`, and of the whole model."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``splitnn fingerprint``."""
    p.add_argument("model", type=Path, help="a model file (safetensors) written by splitnn")
    p.add_argument(
        "--segments",
        default=None,
        metavar="N,N,...",
        help="layers per segment of an nn.Sequential model (default: as the file records them, if it does)",
    )
    p.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="MODULE",
        help="modules whose classes the model file may name (repeatable), as splitnn.load_model(trust=...)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from torch import nn

    from splitnn.split.persist import load_model, saved_segments
    from splitnn.wire.fingerprint import fingerprint

    model = load_model(args.model, trust=args.trust or None)
    sizes = (
        list(parse_positive_ints(args.segments, "--segments", "2,2,2"))
        if args.segments is not None
        else saved_segments(args.model)
    )
    rows = []
    if sizes is not None:
        if not isinstance(model, nn.Sequential):
            raise ConfigurationError(
                f"{args.model} holds a {type(model).__name__}, not an nn.Sequential: its segments cannot be "
                f"sliced by layer counts; fingerprint the segments from Python (splitnn.wire.fingerprint)"
            )
        layers = list(model.children())
        if sum(sizes) != len(layers):
            raise ConfigurationError(
                f"--segments {','.join(map(str, sizes))} adds up to {sum(sizes)} layers, but {args.model} has "
                f"{len(layers)}"
            )
        start = 0
        for i, size in enumerate(sizes):
            part = nn.Sequential(*layers[start : start + size])
            rows.append({"segment": i, "layers": f"{start}-{start + size - 1}", "fingerprint": fingerprint(part)})
            start += size
    whole = fingerprint(model)
    if args.json:
        print(json.dumps({"model": str(args.model), "segments": rows, "whole": whole}, indent=2))
        return 0
    if rows:
        print(
            table(["segment", "layers", "fingerprint"], [[r["segment"], r["layers"], r["fingerprint"]] for r in rows])
        )
        print()
    print(f"whole model: {whole}")
    if rows:
        print("\nfor a data holder's policy.toml (its own segment, e.g. the first):")
        print(f'accept_segments = ["{rows[0]["fingerprint"]}"]')
    return 0
