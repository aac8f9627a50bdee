"""``splitnn worker --config worker.toml``: the worker's settings from a file, flags overriding them.

The file's keys are the long flags' names with ``_`` for ``-`` (``token_file``, ``tls_cert``,
``data_listen``, ...); a repeatable flag (``data``, ``trust``) takes a list, a switch
(``allow_outputs``) ``true``/``false``. Relative paths are relative to the file, so a kit can be
moved as a whole. A flag given on the command line wins over the file; an unknown key, or a value
of the wrong type, is an error naming the file, its line and the key, before the worker starts.
``splitnn provision`` writes one such file per party (:mod:`splitnn.deploy.kits`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from splitnn.errors import ConfigurationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _line(text: str, key: str) -> str:
    from splitnn.deploy.federation import _line as line_of

    n = line_of(text, None, 0, key)
    return f", line {n}" if n else ""


def apply_worker_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill ``args`` from ``args.config`` where the command line left a flag at its default; return ``args``."""
    path: Path | None = getattr(args, "config", None)
    if path is None:
        return args
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"--config {path}: cannot read it: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"--config {path}: not valid TOML: {exc}") from None
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    base = Path(path).resolve().parent
    for key, value in doc.items():
        action = actions.get(key)
        where = f"--config {path}{_line(text, key)}"
        if action is None:
            raise ConfigurationError(f"{where}: unknown key {key!r}; the keys are {sorted(actions)}")
        if getattr(args, key) != action.default:
            continue  # the command line overrides the file
        setattr(args, key, _value(action, value, base, f"{where}: {key}"))
    return args


def _value(action: argparse.Action, value: object, base: Path, where: str) -> object:
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ConfigurationError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigurationError(f"{where} must be a list of strings, got {value!r}")
        return list(value)
    kind = action.type
    if kind is Path:
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"{where} must be a path (a string), got {value!r}")
        return base / value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(f"{where} must be a whole number, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigurationError(f"{where} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigurationError(f"{where} must be a string, got {value!r}")
    return value


def check_worker_identity(tls, name: str) -> None:
    """Refuse to start a worker whose TLS certificate names another party (or has expired).

    Needs the ``cryptography`` package to read the certificate; without it, the check is skipped with a
    warning (the peers' and researchers' TLS checks still refuse such a worker, later and less clearly).
    """
    import logging

    try:
        import cryptography  # noqa: F401
    except ImportError:  # pragma: no cover - the deploy extra is missing
        logging.getLogger("splitnn.worker").warning(
            "worker %s: cannot check that its certificate names it (pip install 'splitnn[deploy]')", name
        )
        return
    from splitnn.transport.certificates import check_certificate_name

    check_certificate_name(tls.cert, name)
