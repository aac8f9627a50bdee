"""Model completion: alice labels samples with her trained bottom segment and 40 known labels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from splitnn.data import load_dataset
from splitnn.errors import ConfigurationError
from splitnn.models import tutorial_mlp
from splitnn.privacy.attacks.completion import ModelCompletion, few_labels
from splitnn.split import SplitNN
from splitnn.workers import VirtualWorker


def test_model_completion_from_40_labels_beats_the_same_labels_on_an_untrained_segment(fmnist_dir):
    d = load_dataset("fashion-mnist", "train", data_dir=fmnist_dir, download=False, progress=False, limit=3000)
    private, aux = d.subset(slice(0, 2000)), d.subset(slice(2000, 3000))
    torch.manual_seed(0)
    segments = tutorial_mlp((128, 640), in_features=784, classes=10)
    untrained = copy.deepcopy(segments[0])
    model = SplitNN(
        [segments[0], nn.Sequential(*segments[1:])],
        [VirtualWorker("alice"), VirtualWorker("bob")],
        optimizer="sgd:lr=0.05",
    )
    model.fit(private, epochs=2, batch_size=64, progress=False)
    known = few_labels(aux.labels, 4, 10)
    assert known.numel() == 40 and torch.equal(torch.bincount(aux.labels[known]), torch.full((10,), 4))
    acc = {}
    with torch.no_grad():
        for name, bottom in (("trained", segments[0]), ("untrained", untrained)):
            completion = ModelCompletion(10).fit(bottom(aux.features[known]), aux.labels[known])
            acc[name] = completion.accuracy(bottom(private.features), private.labels)
    # measured: 0.655 from the trained segment, 0.562 from an untrained one, bob's own model 0.678; chance 0.1
    assert acc["trained"] > 0.6
    assert acc["trained"] > acc["untrained"] + 0.05


def test_model_completion_checks_its_inputs():
    with pytest.raises(ConfigurationError, match="class 2 has only"):
        few_labels(torch.tensor([0, 1, 0, 1]), 1, 3)
    with pytest.raises(ConfigurationError, match="fit"):
        ModelCompletion(3).predict(torch.randn(2, 4))
