"""``splitnn provision``: write a federation's startup kits from its ``federation.toml``.

    splitnn provision federation.toml --out kits/          # a CA, and a kit per party and researcher
    splitnn provision federation.toml --out kits/ --add    # later: kits for new parties/researchers only

See :mod:`splitnn.deploy.kits` for what a kit holds and docs/deploying.md for the whole walk.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write a federation's kits (CA, certificates, token, worker.toml, scripts) from federation.toml"
DESCRIPTION = "Make the federation's CA and one startup kit per party and per researcher."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``splitnn provision``."""
    p.add_argument("federation", type=Path, help="the federation file (parties, researchers; docs/deploying.md)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the kits go (one directory each)")
    p.add_argument(
        "--add",
        action="store_true",
        help="DIR holds this federation already: keep its CA, token and kits; write kits for new names only",
    )


def run(args: argparse.Namespace) -> int:
    from splitnn.deploy.kits import PROVISIONER, provision

    written = provision(args.federation, args.out, add=args.add)
    if not written:
        print(f"splitnn provision: every kit exists already in {args.out}; nothing written")
        return 0
    for name in written:
        print(f"  {args.out / name}/")
    print(
        f"splitnn provision: wrote {len(written)} kit(s) into {args.out}; hand each to its owner. "
        f"Keep {args.out / PROVISIONER} (the CA key) to yourself."
    )
    return 0
