"""The ``splitnn`` command line."""

from __future__ import annotations

import argparse
import sys

from splitnn.errors import SplitNNError


def build_parser() -> argparse.ArgumentParser:
    from splitnn.cli import train

    parser = argparse.ArgumentParser(prog="splitnn", description="Split learning for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``splitnn`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SplitNNError as exc:
        print(f"splitnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"splitnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
