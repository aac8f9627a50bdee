"""A party's data as any map-style torch Dataset: read in batches with a DataLoader in the order of
epoch_batches, never materialised, and a run on it equals the run on the same tensors bit for bit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset as MapDataset
from torch.utils.data import IterableDataset, TensorDataset

import splitnn
from splitnn.data import Dataset, TorchDataset
from splitnn.errors import DataError
from splitnn.models import tutorial_mlp
from splitnn.training import epoch_batches
from tests.helpers import assert_same_weights, toy_dataset


class Recording(MapDataset):
    """A map-style dataset that logs every index it is asked for (and can only be read item by item)."""

    def __init__(self, tensor: torch.Tensor, as_numpy: bool = False) -> None:
        self.tensor, self.as_numpy, self.reads = tensor, as_numpy, []

    def __len__(self) -> int:
        return len(self.tensor)

    def __getitem__(self, i: int):
        self.reads.append(i)
        item = self.tensor[i]
        return item.numpy() if self.as_numpy else item


def _chain():
    return [splitnn.VirtualWorker(n) for n in ("alice", "bob", "claire")]


def test_torch_dataset_run_equals_the_tensor_run_bit_for_bit():
    data = toy_dataset(150, seed=1)
    torch.manual_seed(0)
    segments = tutorial_mlp()
    tensors = splitnn.SplitNN(copy.deepcopy(segments), _chain())
    mapped = splitnn.SplitNN(copy.deepcopy(segments), _chain())
    h1 = tensors.fit(data, epochs=2, batch_size=32, test_data=data, progress=False)
    wrapped = TorchDataset(TensorDataset(data.features, data.labels), features=0, labels=1, name="toy")
    h2 = mapped.fit(wrapped, epochs=2, batch_size=32, test_data=wrapped, progress=False)
    assert h1.losses() == h2.losses()
    assert [e.test_metrics for e in h1.epochs] == [e.test_metrics for e in h2.epochs]
    assert_same_weights(tensors.collect(), mapped.collect())
    assert tensors.ledger.links() == mapped.ledger.links()


def test_each_party_reads_only_its_batches_in_epoch_order():
    data = toy_dataset(70, seed=2)
    features, labels = Recording(data.features, as_numpy=True), Recording(data.labels)
    alice, bob, claire = _chain()
    alice.add_dataset("d", features=features)
    claire.add_dataset("d", labels=labels)
    torch.manual_seed(0)
    segments = tutorial_mlp()
    model = splitnn.SplitNN(copy.deepcopy(segments), [alice, bob, claire])
    model.prepare("d")
    assert features.reads == [0]  # the feature shape, from one item
    assert labels.reads == list(range(70))  # the labels' summary, read once before training
    features.reads.clear()
    labels.reads.clear()
    model.fit("d", epochs=2, batch_size=16, seed=3, progress=False)
    order = [i for e in range(2) for idx in epoch_batches(70, 16, seed=3, epoch=e) for i in idx.tolist()]
    assert features.reads == order and labels.reads == order  # batch by batch, in the one data order
    twin = splitnn.SplitNN(copy.deepcopy(segments), _chain())
    twin.fit(data, epochs=2, batch_size=16, seed=3, progress=False)
    assert_same_weights(model.collect(), twin.collect())


def test_numpy_arrays_are_held_as_tensors():
    data = toy_dataset(40, seed=4)
    torch.manual_seed(0)
    segments = tutorial_mlp()
    a = splitnn.SplitNN(copy.deepcopy(segments), _chain())
    b = splitnn.SplitNN(copy.deepcopy(segments), _chain())
    a.fit(data, epochs=1, batch_size=8, progress=False)
    b.fit(Dataset(data.features.numpy(), data.labels.numpy(), "np"), epochs=1, batch_size=8, progress=False)
    assert_same_weights(a.collect(), b.collect())


def test_dict_items_and_function_selectors():
    data = toy_dataset(30, seed=5)

    class Records(MapDataset):
        def __len__(self):
            return 30

        def __getitem__(self, i):
            return {"image": data.features[i], "target": int(data.labels[i])}

    torch.manual_seed(0)
    segments = tutorial_mlp()
    by_key = splitnn.SplitNN(copy.deepcopy(segments), _chain())
    by_fn = splitnn.SplitNN(copy.deepcopy(segments), _chain())
    by_key.fit(TorchDataset(Records(), features="image", labels="target"), epochs=1, batch_size=8, progress=False)
    by_fn.fit(
        TorchDataset(Records(), features=lambda r: r["image"], labels=lambda r: r["target"]),
        epochs=1,
        batch_size=8,
        progress=False,
    )
    assert_same_weights(by_key.collect(), by_fn.collect())


def test_bad_sources_get_clear_errors():
    worker = splitnn.VirtualWorker("alice")

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(3)

    with pytest.raises(DataError, match="IterableDataset.*map-style"):
        worker.add_dataset("s", features=Stream())
    with pytest.raises(DataError, match="tensor, a numpy array or a map-style"):
        worker.add_dataset("s", features=42)
    pairs = TensorDataset(torch.zeros(4, 3), torch.zeros(4))
    worker.add_dataset("pairs", features=pairs)  # items are (x, y) tuples: refused when read
    with pytest.raises(DataError, match="TorchDataset"):
        worker.dataset_stats("pairs")
    with pytest.raises(DataError, match="cannot take the labels \\(5\\) of item 0"):
        TorchDataset(pairs, features=0, labels=5).parts()[1][0]
    with pytest.raises(DataError, match="empty"):
        TorchDataset(TensorDataset(torch.zeros(0, 3)))
    labels = Recording(torch.tensor([0, -2, 1]))
    worker.add_dataset("neg", labels=labels)
    with pytest.raises(splitnn.LabelError, match="-2"):
        worker.dataset_stats("neg")


def test_map_style_label_summaries_match_tensor_ones():
    y = torch.tensor([0.0, 1.0, 1.0, 0.25])
    worker = splitnn.VirtualWorker("bob")
    worker.add_dataset("t", labels=y)
    worker.add_dataset("m", labels=Recording(y))
    worker.add_dataset("py", labels=[0.0, 1.0, 1.0, 0.25])  # a list of Python floats is a map-style dataset too
    t, m, py = (worker.dataset_stats(n) for n in ("t", "m", "py"))
    assert (t.label_min, t.label_max, t.label_integral, t.label_shape) == (0.0, 1.0, False, ())
    assert (m.label_min, m.label_max, m.label_integral, m.label_dtype) == (0.0, 1.0, False, "float32")
    assert py.label_dtype == "float64" and py.label_max == 1.0
    np.testing.assert_array_equal(np.array([t.size, m.size, py.size]), 4)
