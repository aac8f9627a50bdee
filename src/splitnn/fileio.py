"""Atomic file output: a report, a history or a model file is either complete or not there.

Every file the library or the command line writes for the user goes through
:func:`atomic_path`: the content is written to a hidden temporary file beside the
destination and renamed onto it only once complete, so an error or an interrupt
half-way leaves the previous file (or no file) rather than a truncated one. A process killed
half-way (``SIGKILL``, a power cut) cannot clean up: its temporary file stays, hidden and named
so that nothing reads it as the destination, and :func:`remove_stale_temps` deletes it when the
directory is next used.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "remove_stale_temps", "temp_pattern"]


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); on success it replaces ``path``.

    On any exception (``KeyboardInterrupt`` included) the temporary file is removed and
    ``path`` is left as it was. The new file gets ``path``'s permissions when it
    replaces one, else the usual ``0666 & ~umask`` (not the temporary file's ``0600``).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        mode = path.stat().st_mode & 0o7777 if path.exists() else _default_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _temp_prefix(name: str) -> str:
    return f".{name}."


def temp_pattern(name: str = "*") -> str:
    """The glob of the temporary files :func:`atomic_path` makes for a destination named ``name``
    (a glob itself: ``"*"`` matches every destination)."""
    suffix = Path(name).suffix if name != "*" else "*"
    return f"{_temp_prefix(name)}*.tmp{suffix}" if name != "*" else ".*.*.tmp*"


def remove_stale_temps(directory: str | os.PathLike, name: str = "*") -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_path` left in ``directory`` (for destinations
    matching ``name``, a glob); return them. Call it only where no other writer is at work on those files."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for tmp in directory.glob(temp_pattern(name)):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
