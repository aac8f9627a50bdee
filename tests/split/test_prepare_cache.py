"""prepare() caches placed datasets by object, never by a reusable id()."""

from __future__ import annotations

import gc

import torch
from torch import nn

import splitnn
from splitnn.data import Dataset
from splitnn.training.baselines import FedAvg


def _data(label: int) -> Dataset:
    return Dataset(torch.randn(12, 4), torch.full((12,), label), "d", 3)


def test_a_new_dataset_is_never_mistaken_for_a_freed_one():
    torch.manual_seed(0)
    model = splitnn.SplitNN(
        [nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 3), nn.LogSoftmax(dim=1))],
        [splitnn.VirtualWorker("a"), splitnn.VirtualWorker("b")],
    )
    names = set()
    for label in range(3):
        data = _data(label)
        name, _ = model.prepare(data)
        names.add(name)
        # what is evaluated is this dataset: every prediction is scored against ``label``
        preds = model.predict(data.features).argmax(dim=1)
        assert model.evaluate(data).accuracy == int((preds == label).sum()) / len(data)
        del data
        gc.collect()
    assert len(names) == 3
    again = _data(0)
    assert model.prepare(again) == model.prepare(again)  # the same object is placed once


def test_federation_places_new_shards_even_when_ids_repeat():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1))
    fed = FedAvg(net, [splitnn.VirtualWorker("c0")])
    placed = []
    for label in range(3):
        shard = _data(label)
        placed.append(fed.place([shard])[0][0])
        del shard
        gc.collect()
    assert len(set(placed)) == 3, placed
    # each placement is still what its shard holds: a later placement does not overwrite an earlier one
    for label, name in enumerate(placed):
        stats = fed.clients[0].dataset_stats(name)
        assert stats.label_max == label and stats.size == 12
