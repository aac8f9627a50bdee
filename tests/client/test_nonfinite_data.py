"""A NaN or infinite feature is refused where a dataset is placed, naming the dataset, the row and the fix
(it would silently train every weight to NaN); ``allow_nonfinite=True`` places it anyway."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import splitnn
from splitnn.errors import DataError
from tests.helpers import toy_dataset
from tests.transport.cluster import Cluster


def features_with(value: float, row: int = 3, n: int = 8) -> torch.Tensor:
    x = torch.randn(n, 4)
    x[row, 2] = value
    return x


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_a_nonfinite_feature_is_refused_at_placement_naming_dataset_row_and_fix(value):
    w = splitnn.VirtualWorker("alice")
    with pytest.raises(DataError, match=r"dataset 'scans' for worker 'alice': row 3 holds a non-finite") as err:
        w.add_dataset("scans", features=features_with(value))
    assert "allow_nonfinite=True" in str(err.value) and "nan_to_num" in str(err.value)
    assert "scans" not in w.datasets()  # nothing half-placed


def test_allow_nonfinite_places_it_and_finite_data_is_untouched():
    w = splitnn.VirtualWorker("alice")
    w.add_dataset("scans", features=features_with(math.nan), allow_nonfinite=True)
    w.add_dataset("clean", features=torch.randn(8, 4))
    assert {"scans", "clean"} <= set(w.datasets())
    with pytest.raises(splitnn.ConfigurationError, match="allow_nonfinite must be True or False"):
        w.add_dataset("other", features=torch.randn(8, 4), allow_nonfinite="yes")


def test_fit_on_a_dataset_with_a_nan_feature_is_refused_before_any_weight_changes():
    data = toy_dataset(40, shape=(1, 4, 4), classes=3)
    data.features[17, 0, 1, 2] = math.nan
    torch.manual_seed(0)
    model = splitnn.SplitNN(
        [nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 3), nn.LogSoftmax(1))],
        [splitnn.VirtualWorker("alice"), splitnn.VirtualWorker("bob")],
    )
    before = {k: v.clone() for k, v in model.collect().state_dict().items()}
    with pytest.raises(DataError, match=r"for worker 'alice': row 17 holds a non-finite feature \(nan"):
        model.fit(data, epochs=1, batch_size=8, progress=False)
    after = model.collect().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class Rows(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def test_a_map_style_dataset_is_refused_at_the_batch_that_reads_the_row():
    w = splitnn.VirtualWorker("alice")
    w.add_dataset("rows", features=Rows(features_with(math.inf, row=5)))
    from splitnn.workers.held import HeldData

    held: HeldData = w._data["rows"]
    assert held.read("features", torch.tensor([0, 1, 2])).shape == (3, 4)
    with pytest.raises(DataError, match=r"dataset 'rows' for worker 'alice': row 5 holds a non-finite feature"):
        held.read("features", torch.tensor([4, 5, 6]))
    w.add_dataset("ok", features=Rows(features_with(math.inf, row=5)), allow_nonfinite=True)
    assert w._data["ok"].read("features", torch.tensor([5])).isinf().any()


@pytest.fixture(scope="module")
def bob(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("nonfinite")) as cl:
        cl.start("bob")
        yield cl


def test_a_remote_worker_refuses_it_too_even_when_the_client_skips_its_check(bob, monkeypatch):
    (w,) = bob.connect("bob")
    try:
        with pytest.raises(DataError, match=r"dataset 'scans' for worker 'bob': row 3 holds a non-finite"):
            w.add_dataset("scans", features=features_with(math.nan))  # refused before sending
        monkeypatch.setattr("splitnn.client.datasets.check_finite_features", lambda *a, **k: None)
        with pytest.raises(splitnn.SplitNNError, match=r"row 3 holds a non-finite feature"):
            w.add_dataset("scans", features=features_with(math.nan))  # the worker's own check
        w.add_dataset("scans", features=features_with(math.nan), allow_nonfinite=True)
        assert w.dataset_stats("scans").size == 8
        assert bob.workers["bob"].alive()
    finally:
        w.close()
