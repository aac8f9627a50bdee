"""Named features on the wire (add_dataset): names in the JSON, one tensor frame per name (dtype, shape, bytes;
never pickle), every decoded value bounded and checked, a malformed message a WireError naming the op and field;
and the dataset_stats reply's description of them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitnn.common.operations import OPERATIONS
from splitnn.common.serde.setup import dataset_stats_from_result, dataset_stats_to_result
from splitnn.data.sources import MAX_FEATURE_NAME, MAX_FEATURE_NAMES, NamedFeatures
from splitnn.errors import WireError
from splitnn.transport.limits import Limits
from splitnn.wire.tensor_codec import encode_tensor
from splitnn.workers.held import HeldData

LIMITS = Limits(max_tensor_bytes=1 << 20, max_blob_bytes=1 << 20)
ADD = OPERATIONS["add_dataset"]


def _named():
    return NamedFeatures(
        input_ids=torch.arange(12).reshape(3, 4),
        attention_mask=torch.tensor([[1, 1, 0, 0]] * 3),
        pixel=torch.linspace(0, 1, 6).reshape(3, 2),
    )


def _decode(args, blobs, limits=LIMITS):
    return ADD.decode_args(args, blobs, limits=limits)["parts"]()


def test_named_features_cross_as_named_tensors_in_order():
    labels = torch.tensor([0, 1, 1])
    args, blobs = ADD.encode_args(name="d", parts={"features": _named(), "labels": labels})
    assert args["parts"] == [{"features": ["input_ids", "attention_mask", "pixel"]}, "labels"]
    assert len(blobs) == 4
    got = _decode(args, blobs)
    assert isinstance(got["features"], NamedFeatures) and list(got["features"]) == list(_named())
    for k, v in _named().items():
        assert torch.equal(got["features"][k], v) and got["features"][k].dtype == v.dtype
    assert torch.equal(got["labels"], labels)


def _args(features_entry, extra=()):
    return {"name": "d", "parts": [features_entry, *extra]}


@pytest.mark.parametrize(
    "entry, says",
    [
        ({"features": []}, "named features as"),
        ({"features": [f"f{i}" for i in range(MAX_FEATURE_NAMES + 1)]}, "named features as"),
        ({"features": "input_ids"}, "named features as"),
        ({"features": ["a"], "labels": ["b"]}, "named features as"),
        ({"labels": ["a"]}, "named features as"),
        ({"features": ["a", 3]}, "names a feature '3'"),
        ({"features": [""]}, "names a feature ''"),
        ({"features": ["x" * (MAX_FEATURE_NAME + 1)]}, "a string of 1..128 characters"),
        ({"features": ["a", "a"]}, "names a feature twice"),
    ],
)
def test_a_malformed_list_of_named_features_is_refused_naming_the_op_and_field(entry, says):
    blobs = [encode_tensor(torch.zeros(2, 2))] * 3
    with pytest.raises(WireError, match=f"^add_dataset: command argument 'parts' .*{says}"):
        ADD.decode_args(_args(entry), blobs, limits=LIMITS)


def test_named_and_plain_features_together_or_too_many_parts_are_refused():
    blob = encode_tensor(torch.zeros(2, 2))
    with pytest.raises(WireError, match="^add_dataset: command argument 'parts' .*each once"):
        ADD.decode_args(_args({"features": ["a"]}, ["features"]), [blob] * 2, limits=LIMITS)
    with pytest.raises(WireError, match="^add_dataset: command argument 'parts' must list"):
        ADD.decode_args(_args("labels", ["labels", "ids", "features"]), [blob] * 4, limits=LIMITS)


def test_a_missing_or_bad_or_oversized_feature_tensor_is_named():
    args = _args({"features": ["input_ids", "attention_mask"]})
    with pytest.raises(WireError, match="missing its feature 'attention_mask' blob"):
        ADD.decode_args(args, [encode_tensor(torch.zeros(2, 2))], limits=LIMITS)
    with pytest.raises(WireError, match="^add_dataset: command argument 'parts' feature 'attention_mask': "):
        _decode(args, [encode_tensor(torch.zeros(2, 2)), b"not a tensor frame"])
    small = Limits(max_tensor_bytes=1 << 10, max_blob_bytes=1 << 10)
    with pytest.raises(WireError, match="^add_dataset: command argument 'parts' feature 'input_ids': "):
        _decode(args, [encode_tensor(torch.zeros(64, 64)), encode_tensor(torch.zeros(2))], small)


def test_the_stats_of_named_features_cross_and_a_hostile_description_is_refused():
    stats = HeldData.hold("d", "w", features=_named(), labels=torch.tensor([0, 1, 1])).stats("d")
    back = dataset_stats_from_result(dataset_stats_to_result(stats))
    assert back == stats and back.named_features[2] == ("pixel", (2,), "float32")
    good = dataset_stats_to_result(stats)
    for bad in (
        [],
        [["a", [2], "int64"]] * 2,
        [["a", [2], "pickle"]],
        [["a", [-1], "int64"]],
        [["a", [2]]],
        [[3, [2], "int64"]],
        "input_ids",
        [["a", [2] * 9, "int64"]],
    ):
        with pytest.raises(WireError, match="dataset_stats: named_features must be"):
            dataset_stats_from_result({**good, "named_features": bad})


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.sampled_from(["features", "labels", "ids", "a", ""]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["features", "labels", "x"]), inner),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(parts=_json, frames=st.lists(st.binary(max_size=40), max_size=4), good=st.integers(0, 4))
def test_any_parts_list_decodes_to_checked_parts_or_a_wire_error(parts, frames, good):
    """Hostile JSON and blobs: the decoder returns parts of tensors (named ones under checked names), or a
    WireError naming add_dataset; never another exception."""
    blobs = [encode_tensor(torch.zeros(2, 2)) for _ in range(good)] + frames
    try:
        got = _decode({"name": "d", "parts": parts}, blobs)
    except WireError as exc:
        assert str(exc).startswith("add_dataset") or "blob" in str(exc)
        return
    assert {"features", "labels"} & set(got) and set(got) <= {"features", "labels", "ids"}
    features = got.get("features")
    if isinstance(features, NamedFeatures):
        assert 0 < len(features) <= MAX_FEATURE_NAMES
        assert all(isinstance(k, str) and 0 < len(k) <= MAX_FEATURE_NAME for k in features)
        assert all(isinstance(t, torch.Tensor) for t in features.values())
