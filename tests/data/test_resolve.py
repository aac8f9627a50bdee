import dataclasses
import gzip
import shutil
from pathlib import Path

import pytest

from splitnn.data import DATASETS, cache_dir, load_dataset, resolve_dataset_dir, resolve_split_files
from splitnn.errors import ChecksumError, DatasetNotFoundError

TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
TRAIN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")


def _copy(src: Path, dst: Path, files=TEST_FILES + TRAIN_FILES, raw=False) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        if raw:
            (dst / f[:-3]).write_bytes(gzip.decompress((src / f).read_bytes()))
        else:
            shutil.copy(src / f, dst / f)
    return dst


@pytest.fixture
def places(fake_mnist, tmp_path, monkeypatch):
    """Four locations each holding the full fake mnist: data_dir, env, cache, system."""
    fake = fake_mnist()
    d = {k: tmp_path / k for k in ("explicit", "env", "cache", "system")}
    _copy(fake["src"], d["explicit"])
    _copy(fake["src"], d["env"] / "mnist")
    _copy(fake["src"], d["cache"] / "mnist")
    _copy(fake["src"], d["system"])
    monkeypatch.setenv("SPLITNN_DATA", str(d["env"]))
    monkeypatch.setenv("SPLITNN_CACHE", str(d["cache"]))
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(DATASETS["mnist"], system_dirs=(str(d["system"]),)))
    return d


def _where(**kw) -> Path:
    images, labels = resolve_split_files("mnist", "test", download=False, **kw)
    assert images.parent == labels.parent
    return images.parent


def test_order_data_dir_env_cache_system(places):
    assert _where(data_dir=places["explicit"]) == places["explicit"]
    assert _where() == places["env"] / "mnist"
    shutil.rmtree(places["env"] / "mnist")
    assert _where() == places["cache"] / "mnist"
    shutil.rmtree(places["cache"] / "mnist")
    assert _where() == places["system"]
    shutil.rmtree(places["system"])
    with pytest.raises(DatasetNotFoundError):
        _where()


def test_env_root_itself(places, tmp_path, monkeypatch):
    flat = _copy(places["explicit"], tmp_path / "flat")
    monkeypatch.setenv("SPLITNN_DATA", str(flat))
    assert _where() == flat


def test_explicit_dir_is_authoritative(places, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        _where(data_dir=empty)
    msg = str(info.value)
    assert str(empty) in msg and str(places["env"]) not in msg and "--data-dir" in msg


def test_cache_locations(fake_mnist, tmp_path, monkeypatch, isolated_env):
    fake = fake_mnist()
    assert cache_dir() == isolated_env / ".cache" / "splitnn"
    _copy(fake["src"], isolated_env / ".cache" / "splitnn" / "mnist")
    assert _where() == isolated_env / ".cache" / "splitnn" / "mnist"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "splitnn"
    with pytest.raises(DatasetNotFoundError, match="xdg"):
        _where()
    monkeypatch.setenv("SPLITNN_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_raw_files_and_gz_preference(fake_mnist, tmp_path):
    fake = fake_mnist()
    d = _copy(fake["src"], tmp_path / "raw", files=TEST_FILES, raw=True)
    images, labels = resolve_split_files("mnist", "test", data_dir=d, download=False)
    assert images.name == "t10k-images-idx3-ubyte" and labels.name == "t10k-labels-idx1-ubyte"
    ds = load_dataset("mnist", "test", data_dir=d, download=False)
    assert ds.labels.tolist() == fake["arrays"]["test"][1].tolist()
    _copy(fake["src"], d, files=TEST_FILES)
    images, _ = resolve_split_files("mnist", "test", data_dir=d, download=False)
    assert images.name == "t10k-images-idx3-ubyte.gz"


def test_per_split_resolution(fake_mnist, tmp_path, monkeypatch):
    fake = fake_mnist()
    only_test = _copy(fake["src"], tmp_path / "only-test", files=TEST_FILES)
    full = _copy(fake["src"], tmp_path / "cache" / "mnist")
    monkeypatch.setenv("SPLITNN_DATA", str(only_test))
    monkeypatch.setenv("SPLITNN_CACHE", str(tmp_path / "cache"))
    assert _where() == only_test
    train_images, _ = resolve_split_files("mnist", "train", download=False)
    assert train_images.parent == full
    # whole-dataset resolution needs every split in one place
    assert resolve_dataset_dir("mnist", download=False) == full
    assert resolve_dataset_dir("mnist", download=False, splits=["test"]) == only_test


def test_half_split_is_not_a_split(fake_mnist, tmp_path):
    fake = fake_mnist()
    d = _copy(fake["src"], tmp_path / "half", files=TEST_FILES[:1])
    with pytest.raises(DatasetNotFoundError):
        _where(data_dir=d)


def test_local_checksum_mismatch(fake_mnist, tmp_path):
    fake = fake_mnist()
    d = _copy(fake["src"], tmp_path / "bad", files=TEST_FILES)
    bad = d / TEST_FILES[1]
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-1] + b"\x09"))
    with pytest.raises(ChecksumError) as info:
        _where(data_dir=d)
    assert str(bad) in str(info.value) and "delete" in str(info.value)


def test_offline_lists_every_place(tmp_path, monkeypatch, isolated_env):
    monkeypatch.setenv("SPLITNN_DATA", str(tmp_path / "envdata"))
    monkeypatch.setitem(
        DATASETS, "fashion-mnist", dataclasses.replace(DATASETS["fashion-mnist"], system_dirs=(str(tmp_path / "sys"),))
    )
    with pytest.raises(DatasetNotFoundError) as info:
        resolve_split_files("fashion-mnist", "train", download=False)
    msg = str(info.value)
    for place in (
        tmp_path / "envdata" / "fashion-mnist",
        tmp_path / "envdata",
        isolated_env / ".cache" / "splitnn" / "fashion-mnist",
        tmp_path / "sys",
    ):
        assert str(place) in msg
    for hint in ("data_dir=DIR", "--data-dir DIR", "SPLITNN_DATA=DIR", "download"):
        assert hint in msg


def test_splitnn_offline_env_blocks_download(monkeypatch):
    monkeypatch.setenv("SPLITNN_OFFLINE", "1")
    with pytest.raises(DatasetNotFoundError, match="SPLITNN_OFFLINE"):
        resolve_split_files("mnist", "test", download=True)


def test_real_shared_mnist_has_only_test(shared_data):
    assert _where(data_dir=shared_data / "mnist") == shared_data / "mnist"
    with pytest.raises(DatasetNotFoundError, match="train-images"):
        resolve_split_files("mnist", "train", data_dir=shared_data / "mnist", download=False)
