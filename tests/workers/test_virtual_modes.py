"""VirtualWorker leaves a segment's train/eval mode and random streams as it found them."""

from __future__ import annotations

import copy

import torch
from torch import nn

import splitnn
from splitnn.privacy.defenses.noise import CutNoise
from splitnn.workers import BatchRef, VirtualWorker
from tests.helpers import assert_same_weights, toy_dataset, train_twin


def _model(dropout: float = 0.5):
    segs = [
        nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Dropout(dropout)),
        nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.LogSoftmax(dim=1)),
    ]
    return segs, splitnn.SplitNN(segs, [VirtualWorker("a"), VirtualWorker("b")])


def test_evaluate_restores_the_segments_training_mode():
    torch.manual_seed(0)
    segs, model = _model()
    data = toy_dataset(32, shape=(1, 4, 4), classes=4)
    model.fit(data, epochs=1, batch_size=8, test_data=data, progress=False)  # evaluates after the epoch
    assert all(m.training for s in segs for m in s.modules())
    collected = model.collect()
    assert all(m.training for m in collected.modules()), "collect() mixes a train-mode container with eval children"
    model.predict(torch.zeros(2, 1, 4, 4))
    assert all(m.training for s in segs for m in s.modules())


def test_eval_forward_keeps_submodules_frozen_by_the_user():
    w = VirtualWorker("a")
    seg = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    w.add_segment("s", seg, "sgd")
    w.add_dataset("d", features=torch.randn(4, 3))
    w.forward("s", BatchRef("d", torch.arange(4)), train=True)
    seg[1].eval()  # the owner freezes BatchNorm statistics on purpose
    w.forward("s", BatchRef("d", torch.arange(4)), train=False)
    assert seg.training and seg[0].training and not seg[1].training


def test_probe_draws_nothing_from_a_defense_random_stream():
    """prepare() probes shapes; a noise layer in the segment must not lose draws to the probe."""
    torch.manual_seed(0)
    segs = [
        nn.Sequential(nn.Flatten(), nn.Linear(16, 8), CutNoise(clip=1.0, sigma=0.5, seed=3)),
        nn.Sequential(nn.Linear(8, 4), nn.LogSoftmax(dim=1)),
    ]
    twin_segments = copy.deepcopy(segs)
    data = toy_dataset(32, shape=(1, 4, 4), classes=4)
    model = splitnn.SplitNN(segs, [VirtualWorker("a"), VirtualWorker("b")])
    model.fit(data, epochs=1, batch_size=8, progress=False)
    assert_same_weights(model.collect(), train_twin(twin_segments, data, epochs=1, batch_size=8))


def test_probe_keeps_batchnorm_statistics_and_initialises_lazy_layers_once():
    w = VirtualWorker("a")
    seg = nn.Sequential(nn.LazyLinear(3), nn.BatchNorm1d(3))
    w.add_segment("s", seg, None)
    before = copy.deepcopy(seg[1].state_dict())
    assert w.probe("s", (2, 5)) == (2, 3)
    assert seg[0].weight.shape == (3, 5)  # the probe initialised the real layer, as before
    for k, v in seg[1].state_dict().items():
        assert torch.equal(v, before[k]), k
    assert seg[0].in_features == 5 and seg[0](torch.zeros(1, 5)).shape == (1, 3)
