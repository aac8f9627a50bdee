"""Fixtures for splitnn.data tests: isolated env, generated IDX datasets, shared real data."""

from __future__ import annotations

import dataclasses
import hashlib
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from splitnn.data import DATASETS, write_idx

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real MNIST test / Fashion-MNIST files in ../shared/data (skip if absent)."""
    if not (SHARED_DATA / "mnist").is_dir() or not (SHARED_DATA / "fashion-mnist").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (expected ../shared/data next to the repo)")
    return SHARED_DATA


def _refused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch) -> Path:
    """No test sees the real cache, env or network: HOME and the cache point to a tmp dir,
    and the default mirror is a closed localhost port."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    for var in ("SPLITNN_DATA", "SPLITNN_CACHE", "XDG_CACHE_HOME", "SPLITNN_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SPLITNN_MIRRORS", f"http://127.0.0.1:{_refused_port()}/never/")
    for name, info in list(DATASETS.items()):
        monkeypatch.setitem(DATASETS, name, dataclasses.replace(info, system_dirs=()))
    return home


def make_split_bytes(
    n: int, seed: int, num_classes: int = 10, label_n: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=(label_n if label_n is not None else n,), dtype=np.uint8)
    return images, labels


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch) -> Callable[..., dict]:
    """Write generated gz IDX files for the mnist splits into a source dir and patch the
    registry's sums to match. Returns a dict with the source dir, file bytes and arrays."""

    def make(n_train: int = 50, n_test: int = 20, seed: int = 0, label_n: int | None = None) -> dict:
        src = tmp_path / f"fake-src-{seed}"
        src.mkdir(exist_ok=True)
        info = DATASETS["mnist"]
        sums, arrays = {}, {}
        for split, n in (("train", n_train), ("test", n_test)):
            images, labels = make_split_bytes(n, seed + (split == "test"), label_n=label_n)
            img_name, lab_name = info.files[split]
            write_idx(src / img_name, images)
            write_idx(src / lab_name, labels)
            sums[img_name] = sha(src / img_name)
            sums[lab_name] = sha(src / lab_name)
            arrays[split] = (images, labels)
        monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(info, sha256=sums))
        return {"src": src, "arrays": arrays, "sums": sums, "blobs": {f: (src / f).read_bytes() for f in sums}}

    return make
