"""Command-line options and checks that several commands share.

The data options (``--dataset``, ``--data-dir``, ``--no-download``), the report options (``--out``,
``--no-progress``), the checks their values need before any work starts, and a run's settings taken
from the parsed flags of the same names.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from splitnn.checks import check_positive
from splitnn.errors import ConfigurationError

__all__ = [
    "add_credential_options",
    "add_data_options",
    "add_report_options",
    "check_out_dir",
    "check_positive",
    "config_from_args",
]

T = TypeVar("T")

_DATA_DIR_HELP = "directory holding the dataset's IDX files"


def add_data_options(
    p: argparse.ArgumentParser, *, dataset: str, dataset_help: str, data_dir_help: str = _DATA_DIR_HELP
) -> None:
    """``--dataset`` (default ``dataset``), ``--data-dir`` and ``--no-download``."""
    p.add_argument("--dataset", default=dataset, help=dataset_help)
    p.add_argument("--data-dir", type=Path, default=None, help=data_dir_help)
    p.add_argument("--no-download", action="store_true", help="never download; fail if the data is not found")


def add_report_options(p: argparse.ArgumentParser, *, out: str, out_help: str) -> None:
    """``--out`` (a directory, default ``out``) and ``--no-progress``."""
    p.add_argument("--out", type=Path, default=Path(out), help=out_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_credential_options(p: argparse.ArgumentParser, *, token: str, cert: str, key: str, ca: str) -> None:
    """``--token-file``, ``--tls-cert``, ``--tls-key`` and ``--tls-ca`` (paths; each help text given)."""
    for flag, text in (("--token-file", token), ("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        p.add_argument(flag, type=Path, default=None, help=text)


def check_out_dir(path: Path, flag: str = "--out") -> None:
    """Refuse an output directory that exists as something else, before any work starts."""
    if path.exists() and not path.is_dir():
        raise ConfigurationError(f"{flag} {path} exists and is not a directory")


def config_from_args(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """A settings dataclass ``cls`` whose fields take the parsed flags of the same names; ``given`` values
    (parsed or renamed ones) win, and fields with neither keep their defaults."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = set(given) - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return cls(**{**values, **given})
