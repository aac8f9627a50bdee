"""splitnn.data.standardize: per-feature statistics of the training rows, applied to every dataset."""

from __future__ import annotations

import pytest
import torch

from splitnn.data import Dataset, standardize
from splitnn.errors import DataError


def test_standardize_uses_the_training_rows_statistics():
    train = Dataset(torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 2.001]]), torch.tensor([0, 1]), "t", 2)
    test = Dataset(torch.tensor([[2.0, 6.0, 3.0]]), torch.tensor([1]), "u", 2)
    tr, te = standardize(train, test, min_std=0.01)
    # column 0: mean 2, std 1; column 1: constant 5 (std 0 -> floor 0.01); column 2: mean 2.0005, std 0.0005 -> 0.01
    assert torch.allclose(tr.features, torch.tensor([[-1.0, 0.0, -0.05], [1.0, 0.0, 0.05]]), atol=1e-5)
    assert torch.allclose(te.features, torch.tensor([[0.0, 100.0, 99.95]]), atol=1e-3)
    assert (tr.labels.tolist(), tr.name, tr.num_classes, te.name) == ([0, 1], "t", 2, "u")
    assert train.features[0, 0] == 1.0  # the inputs are left as they were


def test_standardize_keeps_the_feature_shape_and_refuses_mismatches():
    images = Dataset(torch.rand(10, 1, 4, 4), torch.zeros(10, dtype=torch.int64), "img", 1)
    (out,) = standardize(images)
    assert out.features.shape == (10, 1, 4, 4)
    flat = out.features.reshape(10, -1)
    assert torch.allclose(flat.mean(0), torch.zeros(16), atol=1e-5)
    with pytest.raises(DataError, match="same features"):
        standardize(images, Dataset(torch.rand(3, 16), torch.zeros(3, dtype=torch.int64), "flat", 1))
    with pytest.raises(DataError, match="min_std"):
        standardize(images, min_std=0)
