"""Bad input is refused before training with errors that name the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import splitnn
from splitnn.data import Dataset
from splitnn.errors import ConfigurationError, DataError, LabelError, ShapeMismatchError, WorkerError
from splitnn.models import tutorial_mlp
from tests.helpers import toy_dataset


def _workers(*names):
    return [splitnn.VirtualWorker(n) for n in names]


def test_linear_sizes_that_do_not_fit_are_refused_at_construction():
    segments = [nn.Sequential(nn.Linear(784, 128), nn.ReLU()), nn.Sequential(nn.Linear(100, 10))]
    with pytest.raises(ShapeMismatchError) as err:
        splitnn.SplitNN(segments, _workers("alice", "bob"))
    msg = str(err.value)
    assert "segment 0 (at alice)" in msg and "segment 1 (at bob)" in msg and "128" in msg and "100" in msg


def test_shapes_that_only_a_probe_reveals_are_refused_before_training():
    segments = [nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()), nn.Sequential(nn.Linear(100, 10), nn.LogSoftmax(1))]
    model = splitnn.SplitNN(segments, _workers("alice", "bob"))
    before = [p.clone() for s in segments for p in s.parameters()]
    with pytest.raises(ShapeMismatchError) as err:
        model.fit(toy_dataset(32), epochs=1, progress=False)
    msg = str(err.value)
    assert "segment 0 (at alice) outputs shape (2, 2704)" in msg and "segment 1 (at bob)" in msg
    assert all(torch.equal(a, p) for a, p in zip(before, (p for s in segments for p in s.parameters())))
    assert model.ledger.total() == 0


def test_input_that_does_not_fit_the_first_segment_is_named():
    model = splitnn.SplitNN(tutorial_mlp(), _workers("alice", "bob", "claire"))
    with pytest.raises(
        ShapeMismatchError, match=r"segment 0 \(at alice\) cannot take the data's input of shape \(3, 8, 8\)"
    ):
        model.fit(toy_dataset(16, shape=(3, 8, 8)), epochs=1, progress=False)


def test_labels_beyond_the_output_size_are_refused_before_training():
    model = splitnn.SplitNN(tutorial_mlp(classes=10), _workers("alice", "bob", "claire"))
    data = toy_dataset(16, classes=12)
    data.labels[0] = 11
    with pytest.raises(LabelError, match="label 11 but the model has only 10 outputs"):
        model.fit(data, epochs=1, progress=False)
    assert model.ledger.total() == 0


def test_negative_labels_are_refused():
    data = toy_dataset(8)
    worker = splitnn.VirtualWorker("claire")
    with pytest.raises(LabelError, match="-1"):
        worker.add_dataset("d", labels=torch.tensor([0, -1]))
    with pytest.raises(DataError):
        Dataset(data.features[:2], torch.tensor([0, -1]), "bad", 10)


def test_empty_dataset_is_refused():
    with pytest.raises(DataError):
        Dataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long), "empty", 10)
    with pytest.raises(ConfigurationError, match="empty"):
        splitnn.VirtualWorker("alice").add_dataset("e", features=torch.zeros(0, 4))


@pytest.mark.parametrize("n_workers", [2, 4])
def test_segment_and_worker_counts_must_match(n_workers):
    workers = _workers(*[f"w{i}" for i in range(n_workers)])
    with pytest.raises(ConfigurationError, match=f"3 segments but {n_workers} workers"):
        splitnn.SplitNN(tutorial_mlp(), workers)


def test_a_single_segment_is_not_a_split_network():
    with pytest.raises(ConfigurationError, match="at least 2 segments"):
        splitnn.SplitNN([nn.Linear(2, 2)], _workers("alice"))


def test_two_workers_with_one_name_are_refused():
    with pytest.raises(ConfigurationError, match="both named 'alice'"):
        splitnn.SplitNN(tutorial_mlp(), _workers("alice", "bob", "alice"))


def test_bad_loss_and_optimizer_names():
    with pytest.raises(ConfigurationError, match="unknown loss 'hinge'"):
        splitnn.SplitNN(tutorial_mlp(), _workers("a", "b", "c"), loss="hinge")
    with pytest.raises(splitnn.SplitNNError, match="nadam"):
        splitnn.SplitNN(tutorial_mlp(), _workers("a", "b", "c"), optimizer="nadam")


@pytest.mark.parametrize(
    "kwargs, match", [({"epochs": 0}, "epochs"), ({"batch_size": -1}, "batch_size"), ({"epochs": 1.5}, "epochs")]
)
def test_bad_fit_arguments(kwargs, match):
    model = splitnn.SplitNN(tutorial_mlp(), _workers("a", "b", "c"))
    with pytest.raises(ConfigurationError, match=match):
        model.fit(toy_dataset(8), **{"epochs": 1, **kwargs})


def test_unknown_dataset_name_at_worker_is_named():
    model = splitnn.SplitNN(tutorial_mlp(), _workers("a", "b", "c"))
    with pytest.raises(WorkerError, match="worker 'a' holds no dataset 'nope'"):
        model.fit("nope", epochs=1, progress=False)


def test_missing_data_files_raise_a_dataset_error(tmp_path, monkeypatch):
    from splitnn.data import load_dataset
    from splitnn.errors import DatasetNotFoundError

    monkeypatch.setenv("SPLITNN_OFFLINE", "1")
    with pytest.raises(DatasetNotFoundError):
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)
