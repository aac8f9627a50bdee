"""Atomic file output: a report, a history or a model file is either complete or not there.

Every file the library or the command line writes for the user goes through
:func:`atomic_path`: the content is written to a hidden temporary file beside the
destination and renamed onto it only once complete, so an error or an interrupt
half-way leaves the previous file (or no file) rather than a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text"]


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
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
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
