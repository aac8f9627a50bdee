"""End-to-end training on the real MNIST and Fashion-MNIST files in ../shared/data."""

from __future__ import annotations

import pytest
import torch

import splitnn
from splitnn.data import load_dataset
from splitnn.models import tutorial_mlp


def _tutorial_model():
    torch.manual_seed(0)
    return splitnn.SplitNN(
        tutorial_mlp(), [splitnn.VirtualWorker(n) for n in ("alice", "bob", "claire")], optimizer="sgd:lr=0.03"
    )


def test_mnist_test_set_trains_to_high_accuracy(shared_data):
    """Fast real-data check: train on 8,000 MNIST test images, evaluate on the other 2,000."""
    data = load_dataset("mnist", "test", data_dir=shared_data / "mnist", download=False)
    train, held_out = data.subset(slice(0, 8000)), data.subset(slice(8000, 10000))
    model = _tutorial_model()
    history = model.fit(train, epochs=3, batch_size=64, progress=False)
    result = model.evaluate(held_out)
    assert history.losses()[2] < history.losses()[1] < history.losses()[0]
    # Measured 0.9115 with this seed; an untrained net is at 0.10 and one epoch gives ~0.81.
    assert result.accuracy >= 0.90, result


@pytest.mark.slow
def test_fashion_mnist_full_five_epochs_reaches_084(shared_data):
    """The issue's bar: >= 0.84 test accuracy in 5 epochs (plain PyTorch reaches about 0.85 here)."""
    train = load_dataset("fashion-mnist", "train", data_dir=shared_data / "fashion-mnist", download=False)
    test = load_dataset("fashion-mnist", "test", data_dir=shared_data / "fashion-mnist", download=False)
    model = _tutorial_model()
    history = model.fit(train, epochs=5, batch_size=64, test_data=test, progress=False)
    assert history.final.test_accuracy >= 0.84, [e.test_accuracy for e in history.epochs]
    # Bytes per epoch are exactly the cut tensors of 60,000 samples each way.
    assert history.final.bytes_sent == {
        "alice": 60000 * 128 * 4,
        "bob": 60000 * (128 + 640) * 4,
        "claire": 60000 * 640 * 4,
    }
