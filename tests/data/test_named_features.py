"""Several named feature tensors per dataset (a model's keyword inputs): checked on construction, sliced by
every row operation, held by a worker, which reads a batch of them as the tuple the first segment takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import splitnn
from splitnn.data.scaling import standardize
from splitnn.data.sources import MAX_FEATURE_NAMES, NamedFeatures, as_source, read_rows
from splitnn.errors import ConfigurationError, DataError
from splitnn.workers.held import HeldData


def _named(n=6):
    ids = torch.arange(n * 4).reshape(n, 4)
    mask = torch.ones(n, 4, dtype=torch.int64)
    mask[0, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_a_dataset_holds_named_features_in_order_and_subsets_them_row_by_row():
    data = splitnn.Dataset(_named(), torch.arange(6) % 2)
    assert (
        data.named
        and isinstance(data.features, NamedFeatures)
        and list(data.features) == ["input_ids", "attention_mask"]
    )
    sub = data.subset([4, 1])
    assert torch.equal(sub.features["input_ids"], _named()["input_ids"][[4, 1]])
    assert torch.equal(sub.features["attention_mask"], _named()["attention_mask"][[4, 1]])
    assert torch.equal(sub.labels, torch.tensor([0, 1]))
    assert len(data.subset(slice(1, 3))) == 2 and list(data.subset(slice(1, 3)).features) == list(data.features)
    numpy = splitnn.Dataset({k: v.numpy() for k, v in _named().items()}, torch.arange(6) % 2)
    assert torch.equal(numpy.features["input_ids"], _named()["input_ids"])
    assert not splitnn.Dataset(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)).named


@pytest.mark.parametrize(
    "features, match",
    [
        ({}, "non-empty mapping"),
        ({"input_ids": torch.zeros(6, 4, dtype=torch.int64), 3: torch.zeros(6, 4)}, "feature name 3 must be"),
        ({"": torch.zeros(6, 4)}, "feature name '' must be"),
        ({"input_ids": torch.zeros(6, 4, dtype=torch.int32)}, "feature 'input_ids' must be float32 .or int64"),
        ({"x": torch.zeros(6, 4), "mask": torch.zeros(6, dtype=torch.int64)}, "feature 'mask' must be float32"),
        ({"x": torch.zeros(6, 4), "mask": torch.zeros(5, 4)}, "feature 'mask' has 5 rows but 'x' has 6"),
        ({"x": torch.zeros(6, 4), "y": [1, 2]}, "feature 'y' is a list"),
        ({f"f{i}": torch.zeros(6, 2) for i in range(MAX_FEATURE_NAMES + 1)}, "more than the 64 allowed"),
    ],
)
def test_bad_named_features_are_refused_on_construction_naming_the_entry(features, match):
    with pytest.raises(DataError, match=match):
        splitnn.Dataset(features, torch.zeros(6, dtype=torch.int64))


def test_named_features_and_labels_must_have_the_same_rows():
    with pytest.raises(DataError, match="6 feature rows but 5 labels"):
        splitnn.Dataset(_named(), torch.zeros(5, dtype=torch.int64))


def test_a_worker_holds_named_features_and_reads_a_batch_as_their_tuple():
    held = HeldData.hold("d", "alice", features=_named(), labels=torch.arange(6) % 2)
    rows = torch.tensor([3, 0])
    ids, mask = held.read("features", rows)
    assert torch.equal(ids, _named()["input_ids"][rows]) and torch.equal(mask, _named()["attention_mask"][rows])
    assert held.size == 6
    stats = held.stats("d")
    assert stats.named_features == (("input_ids", (4,), "int64"), ("attention_mask", (4,), "int64"))
    assert stats.feature_shape == (4,) and stats.feature_dtype == "int64"
    picked = held.select(torch.tensor([5, 2]))
    assert isinstance(picked.features, NamedFeatures) and picked.size == 2
    assert torch.equal(picked.read("features", torch.tensor([0]))[1], _named()["attention_mask"][[5]])
    assert held.to(torch.device("meta")).features["input_ids"].device.type == "meta"


def test_a_worker_refuses_named_labels_and_a_non_finite_named_feature_naming_it():
    with pytest.raises(ConfigurationError, match="labels are one tensor"):
        HeldData.hold("d", "alice", labels={"y": torch.zeros(6)})
    bad = {"x": torch.zeros(6, 3), "v": torch.zeros(6, 3)}
    bad["v"][2, 1] = float("nan")
    with pytest.raises(DataError, match=r"\(feature 'v'\): row 2 holds a non-finite feature"):
        HeldData.hold("d", "alice", features=bad)
    assert HeldData.hold("d", "alice", features=bad, allow_nonfinite=True).size == 6


def test_a_mapping_keyed_by_integers_stays_a_map_style_dataset_of_items():
    items = {0: torch.tensor([1.0]), 1: torch.tensor([2.0])}
    src = as_source(items, "x")
    assert src is items and torch.equal(read_rows(src, torch.tensor([1, 0])), torch.tensor([[2.0], [1.0]]))
    assert isinstance(as_source({"a": np.zeros((2, 1))}, "x"), NamedFeatures)


def test_functions_that_take_one_feature_tensor_refuse_named_features_naming_them():
    data = splitnn.Dataset({"a": torch.zeros(4, 2), "b": torch.ones(4, 2)}, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(
        ConfigurationError, match=r"standardize takes one feature tensor; dataset 'data' has named features \(a, b\)"
    ):
        standardize(data)


def test_topologies_that_partition_one_feature_tensor_refuse_named_features_naming_them():
    from torch import nn

    from splitnn.data import vertical_split
    from splitnn.split.placement import features_and_labels
    from splitnn.training.baselines.common import evaluate_module
    from splitnn.training.topologies.vertical import VerticalData

    data = splitnn.Dataset(_named(), torch.arange(6) % 2)
    with pytest.raises(ConfigurationError, match=r"partitions the features takes one feature tensor.*\(input_ids, "):
        features_and_labels(data, "the holders", tensors_only=True)
    assert features_and_labels(data, "the workers")[0] is data.features  # a chain takes them
    with pytest.raises(ConfigurationError, match=r"vertical_split takes one feature tensor.*\(input_ids, attention"):
        vertical_split(data.features, [torch.tensor([0])])
    with pytest.raises(ConfigurationError, match=r"vertical_split takes one feature tensor"):
        VerticalData.from_dataset(data, [torch.tensor([0]), torch.tensor([1])])
    with pytest.raises(ConfigurationError, match=r"evaluate_module \(the baselines\) takes one feature tensor"):
        evaluate_module(nn.Identity(), data)
