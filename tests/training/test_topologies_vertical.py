"""Vertically partitioned split learning: exactness against a twin, the ledger, validation, real data."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

import splitnn
from splitnn.data import column_partition, load_dataset
from splitnn.errors import ConfigurationError, ShapeMismatchError
from splitnn.training import epoch_batches
from splitnn.training.topologies import VerticalData, VerticalSplitNN
from splitnn.training.topologies.presets import vertical_mlp
from tests.helpers import toy_dataset

W = splitnn.VirtualWorker


class Twin(nn.Module):
    """The same layers as one network that cuts each party's columns out of the sample itself."""

    def __init__(self, bottoms, top, columns, merge, shapes=None):
        super().__init__()
        self.bottoms, self.columns, self.merge, self.shapes = nn.ModuleList(bottoms), columns, merge, shapes
        self.top = nn.Sequential(*[layer for segment in top for layer in segment])  # the layers, in one Sequential

    def forward(self, x):
        flat = x.flatten(1)
        parts = [flat[:, c] for c in self.columns]
        if self.shapes is not None:
            parts = [p.reshape(-1, *shape) for p, shape in zip(parts, self.shapes)]
        outs = [b(p) for b, p in zip(self.bottoms, parts)]
        if self.merge == "concat":
            z = torch.cat(outs, dim=1)
        else:
            z = outs[0]
            for o in outs[1:]:
                z = z + o
            if self.merge == "mean":
                z = z / len(outs)
        return self.top(z)


def _train_twin(twin, data, *, epochs, batch_size, seed, lr=0.03):
    opt = torch.optim.SGD(twin.parameters(), lr=lr)
    for epoch in range(epochs):
        for idx in epoch_batches(len(data), batch_size, seed=seed, epoch=epoch):
            opt.zero_grad()
            nn.NLLLoss()(twin(data.features[idx]), data.labels[idx]).backward()
            opt.step()
    return twin


def _vertical(k=2, merge="concat", fuse=True, hidden=(32, 24), part_sizes=None, **kwargs):
    part_sizes = part_sizes or [len(c) for c in column_partition((1, 28, 28), k)]
    bottoms, top = vertical_mlp(part_sizes, hidden, 10, merge)
    initial = (copy.deepcopy(bottoms), copy.deepcopy(top))
    holders = [W(f"alice{i + 1}", fuse=fuse) for i in range(k)]
    model = VerticalSplitNN(bottoms, holders, top, W("bob", fuse=fuse), merge=merge, **kwargs)
    return model, initial


# -- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("merge", ["concat", "sum", "mean"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
def test_vertical_matches_a_twin_that_slices_columns_itself(merge, fuse):
    torch.manual_seed(0)
    data = toy_dataset(120)
    model, (bottoms, top) = _vertical(2, merge, fuse)
    model.fit(data, epochs=2, batch_size=16, seed=4, progress=False)
    twin = _train_twin(
        Twin(bottoms, top, column_partition((1, 28, 28), 2), merge), data, epochs=2, batch_size=16, seed=4
    )
    got, want = model.collect().state_dict(), twin.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_three_holders_with_contiguous_columns_of_flat_features():
    torch.manual_seed(1)
    data = toy_dataset(90, shape=(30,))
    columns = column_partition(30, 3, "contiguous")
    model, (bottoms, top) = _vertical(3, "concat", part_sizes=[10, 10, 10], columns=columns)
    model.fit(data, epochs=1, batch_size=10, progress=False)
    twin = _train_twin(Twin(bottoms, top, columns, "concat"), data, epochs=1, batch_size=10, seed=0)
    for (k, a), b in zip(model.collect().state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k
    collected = model.collect()
    with torch.no_grad():
        assert torch.equal(collected(data.features[:5]), twin(data.features[:5]))


def test_image_strips_reshaped_for_convolutional_bottoms():
    torch.manual_seed(6)
    data = toy_dataset(48)
    columns = column_partition((1, 28, 28), 2)
    bottoms = [
        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()) for _ in range(2)
    ]  # a 1x28x14 strip -> 2x14x7 = 196 values
    top = [nn.Sequential(nn.Linear(392, 10), nn.LogSoftmax(dim=1))]
    twin = Twin(copy.deepcopy(bottoms), copy.deepcopy(top), columns, "concat", shapes=[(1, 28, 14)] * 2)
    model = VerticalSplitNN(
        bottoms, [W("left"), W("right")], top, W("bob"), columns=columns, column_shapes=[(1, 28, 14), (1, 28, 14)]
    )
    model.fit(data, epochs=1, batch_size=16, progress=False)
    _train_twin(twin, data, epochs=1, batch_size=16, seed=0)
    for (k, a), b in zip(model.collect().state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k


# -- the ledger --------------------------------------------------------------------------------
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
def test_no_holder_receives_another_holders_features_or_activations(fuse):
    torch.manual_seed(2)
    model, _ = _vertical(3, "concat", fuse, hidden=(8, 16))
    train, test = toy_dataset(60), toy_dataset(30, seed=3)
    model.fit(train, epochs=1, batch_size=20, test_data=test, progress=False)
    ledger = model.ledger
    holders = [h.name for h in model.holders]
    for a in holders:
        for b in holders:
            assert ledger.total(src=a, dst=b) == 0
        # each holder talks only to the merging party: its 8-wide activations out, their gradient back
        received = {(l.src, l.kind): l.nbytes for l in ledger.links() if l.dst == a}
        assert received == {("bob", "gradient"): 60 * 8 * 4}
        sent = {(l.dst, l.kind): l.nbytes for l in ledger.links() if l.src == a}
        assert sent == {("bob", "activation"): (60 + 30) * 8 * 4}
    assert ledger.total(kind="features") == ledger.total(kind="labels") == 0


def test_merge_of_sum_sends_each_holder_the_full_gradient():
    torch.manual_seed(3)
    model, _ = _vertical(2, "sum", hidden=(12, 16))
    model.fit(toy_dataset(40), epochs=1, batch_size=20, progress=False)
    for holder in model.holders:
        assert model.ledger.total(src="bob", dst=holder.name, kind="gradient") == 40 * 12 * 4


# -- data alignment and refusals before training ----------------------------------------------
def _parts(n=24, seed=0):
    data = toy_dataset(n, shape=(8,), seed=seed)
    return data, [data.features[:, :4], data.features[:, 4:]]


def _flat_model(merge="concat", widths=(6, 6), top_in=None):
    bottoms = [nn.Sequential(nn.Linear(4, w), nn.ReLU()) for w in widths]
    top_in = top_in or (sum(widths) if merge == "concat" else widths[0])
    top = [nn.Sequential(nn.Linear(top_in, 10), nn.LogSoftmax(dim=1))]
    return VerticalSplitNN(bottoms, [W("a1"), W("a2")], top, W("bob"), merge=merge)


def test_rows_are_aligned_by_sample_id():
    data, (left, right) = _parts()
    ids = torch.arange(100, 124)
    g = torch.Generator().manual_seed(0)
    p_right, p_labels = torch.randperm(24, generator=g), torch.randperm(24, generator=g)
    shuffled = VerticalData(
        [left, right[p_right]], data.labels[p_labels], ids=[ids, ids[p_right]], label_ids=ids[p_labels]
    )
    torch.manual_seed(5)
    by_id = _flat_model()
    torch.manual_seed(5)
    in_order = _flat_model()
    by_id.fit(shuffled, epochs=1, batch_size=8, progress=False)
    in_order.fit(VerticalData([left, right], data.labels), epochs=1, batch_size=8, progress=False)
    for x, y in zip(by_id.collect().state_dict().values(), in_order.collect().state_dict().values()):
        assert torch.equal(x, y)


def test_different_sample_counts_are_refused_before_training():
    data, (left, right) = _parts()
    model = _flat_model()
    with pytest.raises(ConfigurationError, match=r"different numbers of samples \(a1 24, a2 23"):
        model.fit(VerticalData([left, right[:23]], data.labels), epochs=1, progress=False)
    assert model.ledger.total() == 0


def test_different_sample_ids_are_refused_before_training():
    data, (left, right) = _parts()
    ids = torch.arange(24)
    other = ids.clone()
    other[5] = 99
    model = _flat_model()
    with pytest.raises(ConfigurationError, match=r"a2 holds other samples.*e\.g\. \[99\].*e\.g\. \[5\]"):
        model.fit(VerticalData([left, right], data.labels, ids=[ids, other], label_ids=ids), progress=False)
    assert model.ledger.total() == 0


def test_placed_datasets_with_different_counts_are_refused():
    data, (left, right) = _parts()
    model = _flat_model()
    a1, a2 = model.holders
    a1.add_dataset("clinic", features=left)
    a2.add_dataset("clinic", features=right[:20])
    model.label_holder.add_dataset("clinic", labels=data.labels)
    with pytest.raises(ConfigurationError, match="different numbers of samples"):
        model.fit("clinic", epochs=1, progress=False)


@pytest.mark.parametrize(
    "merge, widths, top_in, match",
    [
        ("sum", (6, 5), None, r"cannot sum activations of different shapes"),
        ("mean", (6, 5), None, r"cannot mean activations"),
        ("concat", (6, 6), 10, r"concat of the holders' activations gives shape \(2, 12\)"),
    ],
)
def test_a_merge_whose_shapes_do_not_fit_is_refused_before_training(merge, widths, top_in, match):
    data, (left, right) = _parts()
    model = _flat_model(merge, widths, top_in)
    with pytest.raises(ShapeMismatchError, match=match):
        model.fit(VerticalData([left, right], data.labels), epochs=1, progress=False)
    assert model.ledger.total() == 0


def test_bad_arrangements_are_refused():
    bottoms = [nn.Linear(4, 6), nn.Linear(4, 6)]
    top = [nn.Sequential(nn.Linear(12, 10), nn.LogSoftmax(dim=1))]
    a1, a2, bob = W("a1"), W("a2"), W("bob")
    with pytest.raises(ConfigurationError, match="at least 2 data holders"):
        VerticalSplitNN(bottoms[:1], [a1], top, bob)
    with pytest.raises(ConfigurationError, match="one per holder"):
        VerticalSplitNN(bottoms, [a1, a2, W("a3")], top, bob)
    with pytest.raises(ConfigurationError, match="both a data holder and a top worker"):
        VerticalSplitNN(bottoms, [a1, a2], top, a2)
    with pytest.raises(ConfigurationError, match="unknown merge"):
        VerticalSplitNN(bottoms, [a1, a2], top, bob, merge="max")
    with pytest.raises(ConfigurationError, match="column groups"):
        VerticalSplitNN(bottoms, [a1, a2], top, bob, columns=[torch.arange(4)])


def test_backward_on_a_merged_segment_names_the_right_call():
    model = _flat_model()
    data, (left, right) = _parts()
    name, _ = model.prepare(VerticalData([left, right], data.labels))
    from splitnn.workers import BatchRef

    batch = BatchRef(name, torch.arange(4))
    refs = [s.worker.forward(s.key, batch) for s in model.bottom_stages]
    merging = model.top_stages[0]
    merging.worker.forward_merged(merging.key, refs, "concat")
    with pytest.raises(splitnn.WorkerError, match="backward_merged"):
        merging.worker.backward(merging.key, None)


# -- real data ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_halves_of_fashion_mnist_reach_083_in_five_epochs(shared_data):
    root = shared_data / "fashion-mnist"
    train = load_dataset("fashion-mnist", "train", data_dir=root, download=False)
    test = load_dataset("fashion-mnist", "test", data_dir=root, download=False)
    torch.manual_seed(0)
    bottoms, top = vertical_mlp([392, 392], (128, 640), 10, "concat")  # left and right halves, 128 each
    model = VerticalSplitNN(bottoms, [W("left"), W("right")], top, W("bob"))
    start = time.perf_counter()
    model.fit(train, epochs=5, batch_size=64, progress=False)
    seconds = time.perf_counter() - start
    accuracy = model.evaluate(test).accuracy
    print(f"vertical halves, 5 epochs: test accuracy {accuracy:.4f} in {seconds:.1f} s")
    assert accuracy >= 0.83
