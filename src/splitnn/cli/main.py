"""The ``splitnn`` command line.

Each subcommand lives in its own module of this package, listed in :data:`COMMANDS`: its ``HELP``
line, ``DESCRIPTION`` (and optional ``EPILOG``), ``add_arguments(parser)`` for its flags and
``run(args)``; :func:`build_parser` makes each subparser from them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from splitnn.errors import SplitNNError

#: Subcommand modules, in the order ``splitnn --help`` lists them.
COMMANDS = ("train", "worker", "fingerprint", "compare", "privacy", "provision", "status")


def build_parser() -> argparse.ArgumentParser:
    from splitnn import __version__

    parser = argparse.ArgumentParser(prog="splitnn", description="Split learning for PyTorch.")
    parser.add_argument("--version", action="version", version=f"splitnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"splitnn.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"splitnn.cli.{name}":
                raise
            continue  # command not part of this build
        p = sub.add_parser(
            name, help=module.HELP, description=module.DESCRIPTION, epilog=getattr(module, "EPILOG", None)
        )
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``splitnn`` command."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # name the subcommand, whose usage shows the flags it does take
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
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
