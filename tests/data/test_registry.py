import hashlib
import pathlib
import re

import pytest

from splitnn.data import DATASETS, get_dataset_info
from splitnn.errors import ConfigurationError


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_registry_sums_match_real_files(shared_data, name):
    info = DATASETS[name]
    checked = 0
    for fname, expected in info.sha256.items():
        path = shared_data / name / fname
        if not path.exists():
            continue  # MNIST train files are not available offline
        assert hashlib.sha256(path.read_bytes()).hexdigest() == expected, fname
        checked += 1
    assert checked == (2 if name == "mnist" else 4)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_entries_complete(name):
    info = DATASETS[name]
    assert info.name == name and info.num_classes == 10 and len(info.classes) == 10
    assert set(info.files) == {"train", "test"}
    for images, labels in info.files.values():
        assert images in info.sha256 and labels in info.sha256
    assert all(re.fullmatch(r"[0-9a-f]{64}", s) for s in info.sha256.values())
    assert len(set(info.sha256.values())) == 4
    assert info.mirrors and all(m.endswith("/") and m.startswith("http") for m in info.mirrors)


def test_fashion_system_dir_and_mnist_mirrors():
    from splitnn.data import registry

    # the autouse fixture blanks system_dirs; check the module's own definition
    src = pathlib.Path(registry.__file__).read_text()
    assert '"/usr/share/datasets/fashion-mnist"' in src
    assert DATASETS["mnist"].mirrors[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"


@pytest.mark.parametrize("alias", ["mnist", "MNIST", "fashion_mnist", "Fashion-MNIST", "fashionmnist"])
def test_aliases(alias):
    assert get_dataset_info(alias).name in DATASETS


def test_unknown_name_lists_known():
    with pytest.raises(ConfigurationError) as info:
        get_dataset_info("cifar10")
    assert "cifar10" in str(info.value) and "mnist" in str(info.value) and "fashion-mnist" in str(info.value)


def test_unknown_split():
    with pytest.raises(ConfigurationError, match="validation"):
        DATASETS["mnist"].split_files("validation")
