"""Download one file over HTTP(S) with a progress bar, SHA-256 verification and atomic rename."""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from splitnn.errors import ChecksumError, DownloadError

__all__ = ["download_file", "sha256_file"]

_CHUNK = 1 << 16


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    sha256: str | None,
    *,
    progress: bool = True,
    timeout: float = 30,
) -> Path:
    """Download ``url`` to ``dest``, verify its SHA-256, and return ``dest``.

    The body is streamed into a hidden temporary file in ``dest``'s directory
    (created if needed) and renamed onto ``dest`` only after the checksum matched,
    so ``dest`` either holds the complete verified file or is left untouched. On
    any failure, interruption (``KeyboardInterrupt``) included, the temporary file
    is removed. A tqdm progress bar is shown on stderr when ``progress`` is true
    and stderr is a terminal. ``sha256=None`` skips verification.

    Raises:
        DownloadError: unsupported URL scheme, HTTP error, connection refused,
            timeout, short read, or ``dest``'s directory not writable.
        ChecksumError: the downloaded bytes do not match ``sha256``.
    """
    dest = Path(dest)
    if not url.lower().startswith(("http://", "https://")):
        raise DownloadError(f"cannot download {url!r}: only http:// and https:// URLs are supported")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise DownloadError(
            f"cannot download {url} to {dest}: directory {dest.parent} is not writable ({exc}); "
            f"choose another data folder (data_dir= in Python, --data-dir on the command line) or set SPLITNN_CACHE to "
            f"a writable directory"
        ) from exc
    tmp = Path(tmp_name)
    ok = False
    try:
        h = hashlib.sha256()
        received = 0
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                length_header = resp.headers.get("Content-Length")
                total = int(length_header) if length_header and length_header.isdigit() else None
                show = progress and sys.stderr.isatty()
                with tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=not show,
                    leave=False,
                ) as bar:
                    while True:
                        chunk = resp.read(_CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                        h.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            if total is not None and received != total:
                raise DownloadError(
                    f"download of {url} to {dest} was cut short: got {received} of {total} bytes; try again"
                )
        except urllib.error.HTTPError as exc:
            raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
        except urllib.error.URLError as exc:
            raise DownloadError(f"download of {url} failed: {exc.reason}") from exc
        except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, resets, short reads
            raise DownloadError(f"download of {url} to {dest} failed: {exc!r}") from exc
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256.lower():
            raise ChecksumError(
                f"download of {url} to {dest}: SHA-256 mismatch (expected {sha256}, got {digest}, "
                f"{received} bytes); the mirror served a wrong or damaged file, nothing was saved. "
                f"Try again or use another mirror (SPLITNN_MIRRORS)"
            )
        os.replace(tmp, dest)
        ok = True
        return dest
    finally:
        if not ok:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
