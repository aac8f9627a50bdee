"""Find a dataset's files on disk, or download them, and verify them.

:func:`resolve_split_files` (where the order of the places searched is written) and
:func:`resolve_dataset_dir`; every ``.gz`` file is checked against the registry's SHA-256.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from splitnn.errors import ChecksumError, DatasetNotFoundError, DownloadError

from .download import download_file, sha256_file
from .registry import DatasetInfo, get_dataset_info

__all__ = [
    "cache_dir",
    "candidate_dirs",
    "resolve_dataset_dir",
    "resolve_split_files",
    "downloads_allowed",
]

PathArg = "str | os.PathLike[str]"

_verified: dict[tuple[str, int, int], str] = {}

#: How a caller names the data folder, in the words of each kind of caller.
_DATA_DIR_FIX = (
    "in Python load_dataset(..., data_dir=DIR), on the command line --data-dir DIR, or for both "
    "export SPLITNN_DATA=DIR once (DIR holds the files, or a folder of them named after the dataset)"
)


def cache_dir() -> Path:
    """Return the user cache root: ``$SPLITNN_CACHE``, ``$XDG_CACHE_HOME/splitnn`` or ``~/.cache/splitnn``."""
    env = os.environ.get("SPLITNN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "splitnn"


def downloads_allowed(download: bool = True) -> bool:
    """True when ``download`` is true and ``$SPLITNN_OFFLINE`` is not set to a true value."""
    offline = os.environ.get("SPLITNN_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return download and not offline


def candidate_dirs(name: str, data_dir: PathArg | None = None) -> list[tuple[str, Path]]:
    """Return the (description, directory) pairs searched for ``name``, in order.

    With ``data_dir`` only that directory is searched (``data_dir/<name>`` first).
    """
    info = get_dataset_info(name)
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        return [("data_dir= / --data-dir", d / info.name), ("data_dir= / --data-dir", d)]
    out: list[tuple[str, Path]] = []
    env = os.environ.get("SPLITNN_DATA")
    if env:
        root = Path(env).expanduser()
        out += [("$SPLITNN_DATA", root / info.name), ("$SPLITNN_DATA", root)]
    out.append(("user cache", cache_dir() / info.name))
    out += [("system directory", Path(s)) for s in info.system_dirs]
    return out


def _mirrors(info: DatasetInfo, mirrors: Sequence[str] | None) -> tuple[str, ...]:
    if mirrors is None:
        env = os.environ.get("SPLITNN_MIRRORS", "").strip()
        mirrors = re.split(r"[,\s]+", env) if env else info.mirrors
    return tuple(m if m.endswith("/") else m + "/" for m in mirrors if m)


def _find_file(d: Path, gz_name: str) -> Path | None:
    for candidate in (d / gz_name, d / gz_name[: -len(".gz")] if gz_name.endswith(".gz") else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _verify(info: DatasetInfo, path: Path) -> None:
    if not path.name.endswith(".gz"):
        return  # uncompressed: structural checks happen in read_idx
    expected = info.sha256.get(path.name)
    if expected is None:
        return
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _verified.get(key)
    if digest is None:
        digest = sha256_file(path)
        _verified[key] = digest
    if digest != expected:
        raise ChecksumError(
            f"{path}: SHA-256 mismatch for {info.name} (expected {expected}, got {digest}). "
            f"The file is damaged or not the published one: delete it and let splitnn "
            f"download it again, or replace it with a good copy"
        )


def _download(
    info: DatasetInfo, target: Path, filenames: Iterable[str], mirrors: tuple[str, ...], progress: bool, looked: str
) -> None:
    for fname in filenames:
        failures: list[BaseException] = []
        for base in mirrors:
            try:
                download_file(base + fname, target / fname, info.sha256.get(fname), progress=progress)
                break
            except (DownloadError, ChecksumError) as exc:
                failures.append(exc)
        else:
            detail = "\n  ".join(str(e) for e in failures) or "no mirrors configured"
            msg = (
                f"{info.name} file {fname} not found locally (looked in:\n  {looked}\n) and could "
                f"not be downloaded into {target}; tried:\n  {detail}\n"
                f"Fix: check your network or SPLITNN_MIRRORS, or put the file in {target}, or give the folder "
                f"that holds the data: {_DATA_DIR_FIX}"
            )
            cls = ChecksumError if failures and all(isinstance(e, ChecksumError) for e in failures) else DownloadError
            raise cls(msg) from (failures[-1] if failures else None)


def _resolve(
    name: str,
    splits: Sequence[str],
    *,
    data_dir: PathArg | None,
    download: bool,
    progress: bool,
    mirrors: Sequence[str] | None,
) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    info = get_dataset_info(name)
    wanted = [f for s in splits for f in info.split_files(s)]
    places = candidate_dirs(info.name, data_dir)
    for _, d in places:
        found = {f: _find_file(d, f) for f in wanted}
        if all(found.values()):
            for p in found.values():
                _verify(info, p)  # type: ignore[arg-type]
            return d, _by_split(info, splits, found)  # type: ignore[arg-type]

    if data_dir is not None:
        # into data_dir/<name> when that directory exists, else into data_dir itself
        target = places[0][1] if places[0][1].is_dir() else places[1][1]
    else:
        target = cache_dir() / info.name
    mirror_list = _mirrors(info, mirrors)
    looked = "\n  ".join(f"{what}: {d}" for what, d in places)
    if not downloads_allowed(download):
        why = "download=False" if not download else "SPLITNN_OFFLINE is set"
        raise DatasetNotFoundError(
            f"{info.name} {'/'.join(splits)} files ({', '.join(wanted)}, gzipped or not) not found; "
            f"looked in:\n  {looked}\nand downloading is disabled ({why}). Fix: give the folder that holds "
            f"the files: {_DATA_DIR_FIX}; or allow downloads (mirrors: {', '.join(mirror_list)})"
        )
    missing = [f for f in wanted if _find_file(target, f) is None]
    _download(info, target, missing, mirror_list, progress, looked)
    found = {f: _find_file(target, f) for f in wanted}
    for p in found.values():
        _verify(info, p)  # type: ignore[arg-type]
    return target, _by_split(info, splits, found)  # type: ignore[arg-type]


def _by_split(info: DatasetInfo, splits: Sequence[str], found: dict[str, Path]) -> dict[str, tuple[Path, Path]]:
    out = {}
    for s in splits:
        img, lab = info.split_files(s)
        out[s] = (found[img], found[lab])
    return out


def resolve_split_files(
    name: str,
    split: str = "train",
    *,
    data_dir: PathArg | None = None,
    download: bool = True,
    progress: bool = True,
    mirrors: Sequence[str] | None = None,
) -> tuple[Path, Path]:
    """Return the (images, labels) file paths of one split, downloading them if needed.

    Looks in ``data_dir``, then ``$SPLITNN_DATA``, the user cache and system paths, and
    downloads into the cache last (:func:`candidate_dirs` lists the places).

    Resolution order (per split; a directory "has" a split when both its images and
    labels files exist there, each either as the published ``.gz`` or uncompressed
    without the ``.gz`` suffix; ``.gz`` is preferred when both exist):

    1. ``data_dir``, when given, is **authoritative**: only ``data_dir/<name>`` and
       ``data_dir`` itself are searched, nothing else. If the split is missing there
       and downloads are allowed, it is downloaded *into* ``data_dir`` (like
       torchvision's ``root=``); otherwise :class:`DatasetNotFoundError`.
    2. ``$SPLITNN_DATA/<name>``, then ``$SPLITNN_DATA``.
    3. The user cache ``<cache>/<name>``, where ``<cache>`` is ``$SPLITNN_CACHE``,
       else ``$XDG_CACHE_HOME/splitnn``, else ``~/.cache/splitnn``.
    4. The dataset's system directories (e.g. ``/usr/share/datasets/fashion-mnist``).
    5. Download from the mirrors, in order, into the user cache. Mirrors come from the
       ``mirrors=`` argument, else ``$SPLITNN_MIRRORS`` (comma/space separated base
       URLs), else the registry. Downloads are disabled by ``download=False`` or by
       ``SPLITNN_OFFLINE=1``.

    Every ``.gz`` file found locally is checked against the registry's SHA-256 (once
    per process per file version); a mismatch raises :class:`ChecksumError` rather than
    falling through to the next place. Uncompressed files get structural checks when
    read (see :func:`splitnn.data.idx.read_idx`).

    Raises:
        ConfigurationError: unknown dataset or split name.
        DatasetNotFoundError: not found and downloads disabled; lists every place looked.
        DownloadError: not found and every mirror failed; names every URL tried.
        ChecksumError: a local ``.gz`` file does not match the registry, or every
            mirror served bytes with the wrong checksum.
    """
    _, files = _resolve(name, [split], data_dir=data_dir, download=download, progress=progress, mirrors=mirrors)
    return files[split]


def resolve_dataset_dir(
    name: str,
    *,
    data_dir: PathArg | None = None,
    download: bool = True,
    progress: bool = True,
    splits: Sequence[str] | None = None,
    mirrors: Sequence[str] | None = None,
) -> Path:
    """Return the first directory holding all ``splits`` (default: every split) of ``name``.

    Missing files are downloaded into the download target (``data_dir`` or the user
    cache). Errors as in :func:`resolve_split_files`.
    """
    info = get_dataset_info(name)
    d, _ = _resolve(
        name,
        list(splits) if splits is not None else list(info.files),
        data_dir=data_dir,
        download=download,
        progress=progress,
        mirrors=mirrors,
    )
    return d
