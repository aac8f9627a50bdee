"""Nested Python values with tensors, as JSON + tensors: exact round trips, no pickle."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from splitnn.errors import WireError
from splitnn.wire.nested import decode_nested, encode_nested


def roundtrip(value):
    encoded, tensors = encode_nested(value)
    return decode_nested(json.loads(json.dumps(encoded, allow_nan=False)), tensors)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.8, 0.9), amsgrad=True),
        lambda p: torch.optim.AdamW(p, lr=1e-3),
        lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
    ],
)
def test_optimizer_state_dicts_round_trip_exactly(make):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = make(model.parameters())
    for _ in range(2):
        model(torch.randn(4, 5)).pow(2).sum().backward()
        opt.step()
    state = opt.state_dict()
    back = roundtrip(state)
    assert back["param_groups"] == state["param_groups"]
    assert isinstance(back["param_groups"][0].get("betas", ()), tuple)
    assert list(back["state"]) == list(state["state"]) and all(isinstance(k, int) for k in back["state"])
    for k, entry in state["state"].items():
        for name, v in entry.items():
            assert torch.equal(back["state"][k][name], v) and back["state"][k][name].dtype == v.dtype


def test_special_floats_survive():
    back = roundtrip({"a": math.inf, "b": -math.inf, "c": [math.nan]})
    assert back["a"] == math.inf and back["b"] == -math.inf and math.isnan(back["c"][0])


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**60), 2**60), st.floats(allow_nan=False), st.text(max_size=5)
)
values = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-5, 5)), inner, max_size=4),
    ),
    max_leaves=20,
)


@given(values)
def test_plain_values_round_trip(value):
    assert roundtrip(value) == value


@pytest.mark.parametrize("bad", [object(), {1.5: 2}, {(1,): 2}, b"bytes", {True: 1}])
def test_other_values_are_refused_on_encoding(bad):
    with pytest.raises(WireError):
        encode_nested(bad)


@pytest.mark.parametrize(
    "bad",
    [{"tensor": "t9"}, {"float": "1e9"}, {"dict": [[1.5, 2]]}, {"dict": [[1]]}, {"what": 1}, {"tuple": 3}],
)
def test_junk_is_refused_on_decoding(bad):
    with pytest.raises(WireError):
        decode_nested(bad, {})
