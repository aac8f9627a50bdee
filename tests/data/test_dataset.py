import numpy as np
import pytest
import torch

from splitnn.data import Dataset, load_dataset, normalize_images, read_idx, write_idx
from splitnn.errors import ConfigurationError, CorruptDataError, DataError, LabelError


def _ds(n=4, labels=None, num_classes=3):
    y = torch.tensor(labels if labels is not None else [i % num_classes for i in range(n)], dtype=torch.int64)
    return Dataset(torch.zeros(len(y), 1, 2, 2), y, "toy", num_classes)


def test_real_mnist_test(shared_data):
    ds = load_dataset("mnist", "test", data_dir=shared_data / "mnist", download=False)
    assert len(ds) == 10000 and ds.num_classes == 10 and ds.name == "mnist"
    assert ds.features.shape == (10000, 1, 28, 28) and ds.features.dtype == torch.float32
    assert ds.labels.dtype == torch.int64
    assert ds.labels.unique().tolist() == list(range(10))
    assert ds.labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert ds.features.min().item() == -1.0 and ds.features.max().item() == 1.0
    raw = read_idx(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz")
    expected = (raw.float() / 255 - 0.5) / 0.5
    assert torch.equal(ds.features[:, 0], expected)


def test_real_mnist_from_parent_dir(shared_data):
    # data_dir/<name> is searched too
    ds = load_dataset("mnist", "test", data_dir=shared_data, download=False, limit=5)
    assert ds.labels.tolist() == [7, 2, 1, 0, 4]


@pytest.mark.parametrize("split, n, first", [("train", 60000, [9, 0, 0, 3, 0]), ("test", 10000, [9, 2, 1, 1, 6])])
def test_real_fashion(shared_data, split, n, first):
    ds = load_dataset("fashion-mnist", split, data_dir=shared_data, download=False)
    assert len(ds) == n and ds.features.shape[1:] == (1, 28, 28)
    assert ds.labels[:5].tolist() == first
    assert ds.labels.bincount().tolist() == [n // 10] * 10
    assert ds.features.min().item() >= -1.0 and ds.features.max().item() <= 1.0


def test_limit_and_fresh_tensors(shared_data):
    a = load_dataset("mnist", "test", data_dir=shared_data / "mnist", download=False, limit=100)
    assert len(a) == 100 and a.labels[:3].tolist() == [7, 2, 1]
    a.features.fill_(5.0)
    a.labels.fill_(0)
    b = load_dataset("mnist", "test", data_dir=shared_data / "mnist", download=False, limit=100)
    assert b.features.max().item() == 1.0 and b.labels[0].item() == 7
    big = load_dataset("mnist", "test", data_dir=shared_data / "mnist", download=False, limit=10**9)
    assert len(big) == 10000


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_bad_limit(limit, shared_data):
    with pytest.raises(ConfigurationError):
        load_dataset("mnist", "test", data_dir=shared_data / "mnist", download=False, limit=limit)


def test_normalize_matches_totensor_normalize():
    x = torch.tensor([[[0, 255], [128, 1]]], dtype=torch.uint8)
    out = normalize_images(x)
    assert out.shape == (1, 1, 2, 2) and out.dtype == torch.float32
    ref = ((x.float() / 255.0) - 0.5) / 0.5
    assert torch.equal(out[:, 0], ref)
    assert out[0, 0, 0, 0].item() == -1.0 and out[0, 0, 0, 1].item() == 1.0


def test_count_mismatch_is_corrupt(fake_mnist, tmp_path):
    fake = fake_mnist(n_train=30, n_test=20, label_n=29)
    with pytest.raises(CorruptDataError, match="30 images but .* 29 labels"):
        load_dataset("mnist", "train", data_dir=fake["src"], download=False)


def test_label_out_of_range_file(fake_mnist, tmp_path):
    fake = fake_mnist()
    raw = tmp_path / "raw"
    raw.mkdir()
    images, _ = fake["arrays"]["test"]
    write_idx(raw / "t10k-images-idx3-ubyte", images)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.full(len(images), 10, np.uint8))
    with pytest.raises(LabelError, match="label 10"):
        load_dataset("mnist", "test", data_dir=raw, download=False)


def test_validation():
    with pytest.raises(DataError, match="3 feature rows but 2 labels"):
        Dataset(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.int64), "x", 2)
    with pytest.raises(DataError, match="empty"):
        Dataset(torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.int64), "x", 2)
    with pytest.raises(LabelError, match="label 3"):
        _ds(labels=[0, 3], num_classes=3)
    with pytest.raises(LabelError, match="label -1"):
        _ds(labels=[0, -1], num_classes=3)
    with pytest.raises(DataError, match="float32"):
        Dataset(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.int64), "x", 2)
    with pytest.raises(DataError, match="int64"):
        Dataset(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int32), "x", 2)
    with pytest.raises(DataError, match="num_classes"):
        _ds(labels=[0, 0], num_classes=0)
    assert len(_ds(n=6)) == 6


def test_subset():
    ds = Dataset(torch.arange(5.0).reshape(5, 1), torch.tensor([0, 1, 2, 0, 1]), "t", 3)
    sub = ds.subset(torch.tensor([4, 0]))
    assert sub.features[:, 0].tolist() == [4.0, 0.0] and sub.labels.tolist() == [1, 0]
    assert ds.subset([1, 2]).labels.tolist() == [1, 2]
    assert ds.subset(slice(1, 3)).features[:, 0].tolist() == [1.0, 2.0]
    assert sub.name == "t" and sub.num_classes == 3
    with pytest.raises(DataError, match="out of range"):
        ds.subset([5])
    with pytest.raises(DataError, match="empty"):
        ds.subset([])
