"""Tests of splitnn.wire.spec: declarative model specs and their guards."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from splitnn.errors import SpecError, TrustError
from splitnn.wire import (
    Trust,
    decode_state,
    encode_state,
    module_to_spec,
    register_layer,
    registered_layers,
    spec_from_json,
    spec_to_json,
    spec_to_module,
    unregister_layer,
    validate_spec,
)
from splitnn.wire.spec import MAX_SPEC_DEPTH, MAX_SPEC_LAYERS, spec_param_count


def transfer(m: nn.Module) -> nn.Module:
    """What a worker does: spec through JSON text, weights through safetensors bytes."""
    text = spec_to_json(module_to_spec(m))
    m2 = spec_to_module(spec_from_json(text))
    m2.load_state_dict(decode_state(encode_state(m.state_dict())))
    return m2


def n_elements(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())


def tutorial_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 640), nn.ReLU(), nn.Linear(640, 10), nn.LogSoftmax(dim=1)
    )


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(8),
        nn.Conv2d(
            8,
            4,
            kernel_size=(3, 5),
            stride=(1, 2),
            padding=(1, 2),
            dilation=1,
            groups=4,
            bias=False,
            padding_mode="reflect",
        ),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(4 * 14 * 7, 10),
    )


def test_tutorial_mlp_round_trip() -> None:
    torch.manual_seed(0)
    m = tutorial_mlp()
    spec = module_to_spec(m)
    assert spec["type"] == "Sequential"
    assert spec["layers"][0] == {"type": "Linear", "in_features": 784, "out_features": 128, "bias": True}
    assert spec["layers"][5] == {"type": "LogSoftmax", "dim": 1}
    json.dumps(spec, allow_nan=False)  # JSON-serialisable as is
    m2 = transfer(m)
    x = torch.randn(16, 784)
    assert torch.equal(m(x), m2(x))
    assert module_to_spec(m2) == spec


def test_small_cnn_round_trip() -> None:
    torch.manual_seed(1)
    m = small_cnn()
    m(torch.randn(8, 1, 28, 28))  # train-mode pass: running stats differ from init
    m2 = transfer(m)
    m.eval(), m2.eval()
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(m(x), m2(x))
    assert module_to_spec(m2) == module_to_spec(m)
    assert spec_param_count(module_to_spec(m)) == n_elements(m)


ALL_BUILTINS = [
    nn.Linear(3, 4, bias=False),
    nn.Conv2d(2, 4, 3, stride=2, padding="valid", dilation=2, groups=2, bias=False, padding_mode="circular"),
    nn.Conv2d(2, 2, (1, 3), padding="same"),
    nn.ReLU(inplace=True),
    nn.LeakyReLU(0.2),
    nn.Sigmoid(),
    nn.Tanh(),
    nn.GELU(approximate="tanh"),
    nn.Softmax(dim=-1),
    nn.LogSoftmax(dim=0),
    nn.MaxPool2d(3, stride=1, padding=1, dilation=1, ceil_mode=True),
    nn.AvgPool2d((2, 3), stride=None, padding=(1, 1), ceil_mode=True, count_include_pad=False, divisor_override=3),
    nn.AdaptiveAvgPool2d((None, 2)),
    nn.AdaptiveAvgPool2d(1),
    nn.Flatten(0, 2),
    nn.Unflatten(1, (2, -1)),
    nn.Dropout(0.1),
    nn.BatchNorm1d(5, eps=1e-3, momentum=None, affine=False, track_running_stats=True),
    nn.BatchNorm2d(3, momentum=0.2, track_running_stats=False),
    nn.Identity(),
    nn.Sequential(OrderedDict([("enc", nn.Linear(2, 3)), ("act", nn.Tanh())])),
    nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Sequential()),
]


@pytest.mark.parametrize("m", ALL_BUILTINS, ids=lambda m: type(m).__name__)
def test_every_builtin_round_trips(m: nn.Module) -> None:
    spec = module_to_spec(m)
    m2 = spec_to_module(spec_from_json(spec_to_json(spec)))
    assert type(m2) is type(m)
    assert module_to_spec(m2) == spec
    assert repr(m2) == repr(m)
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert list(sd) == list(sd2)
    assert all(sd[k].shape == sd2[k].shape and sd[k].dtype == sd2[k].dtype for k in sd)
    assert spec_param_count(spec) == n_elements(m)


def test_builtin_types_are_listed() -> None:
    names = set(registered_layers())
    assert {
        "Linear",
        "Conv2d",
        "ReLU",
        "LeakyReLU",
        "Sigmoid",
        "Tanh",
        "GELU",
        "Softmax",
        "LogSoftmax",
        "MaxPool2d",
        "AvgPool2d",
        "AdaptiveAvgPool2d",
        "Flatten",
        "Unflatten",
        "Dropout",
        "BatchNorm1d",
        "BatchNorm2d",
        "Identity",
    } <= names


def test_defaults_fill_missing_optional_args() -> None:
    m = spec_to_module(
        {
            "type": "Sequential",
            "layers": [
                {"type": "Linear", "in_features": 2, "out_features": 3},
                {"type": "Conv2d", "in_channels": 1, "out_channels": 1, "kernel_size": 3},
                {"type": "Dropout"},
            ],
        }
    )
    assert m[0].bias is not None and m[1].padding == (0, 0) and m[2].p == 0.5


def test_named_sequential_keeps_state_dict_keys() -> None:
    m = nn.Sequential(OrderedDict([("encoder", nn.Linear(2, 3)), ("head", nn.Linear(3, 1))]))
    spec = module_to_spec(m)
    assert spec["names"] == ["encoder", "head"]
    m2 = transfer(m)
    assert list(m2.state_dict()) == ["encoder.weight", "encoder.bias", "head.weight", "head.bias"]


# ----------------------------------------------------------------------------- errors


def test_unknown_type_in_spec() -> None:
    with pytest.raises(SpecError, match=r"unknown layer type 'Transformer'.*register_layer"):
        spec_to_module({"type": "Sequential", "layers": [{"type": "Transformer"}]})


class Custom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_unknown_module_class_travels_as_an_import_that_only_trust_builds() -> None:
    spec = module_to_spec(nn.Sequential(nn.ReLU(), Custom()))
    module = Custom.__module__  # test_wire_spec, or tests.wire.test_wire_spec
    assert spec["layers"][1] == {"import": f"{module}:Custom", "kwargs": {}}
    with pytest.raises(TrustError, match=rf"spec\.layers\[1\].*{module}\.Custom.*--trust {module}`"):
        spec_to_module(spec)
    built = spec_to_module(spec, trust=Trust([module]))
    assert type(built[1]) is Custom


def test_unknown_module_class_in_main_cannot_be_described() -> None:
    cls = type("Local", (nn.Module,), {"__module__": "__main__", "forward": lambda self, x: x})
    with pytest.raises(SpecError, match=r"spec\.layers\[1\].*Local.*__main__.*register_layer"):
        module_to_spec(nn.Sequential(nn.ReLU(), cls()))


def test_subclass_of_known_type_is_not_matched() -> None:
    class MyLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    with pytest.raises(SpecError, match="MyLinear"):
        module_to_spec(MyLinear(2, 2))


@pytest.mark.parametrize(
    "layer,needle",
    [
        ({"type": "Linear", "in_features": 3}, "missing required argument 'out_features'"),
        ({"type": "Linear", "in_features": 3, "out_features": 4, "bais": True}, "unexpected argument 'bais'"),
        ({"type": "Linear", "in_features": "3", "out_features": 4}, "argument 'in_features'"),
        ({"type": "Linear", "in_features": True, "out_features": 4}, "argument 'in_features'"),
        ({"type": "Linear", "in_features": 3.0, "out_features": 4}, "argument 'in_features'"),
        ({"type": "Linear", "in_features": -1, "out_features": 4}, "argument 'in_features'"),
        ({"type": "Linear", "in_features": 3, "out_features": 4, "bias": 1}, "argument 'bias'"),
        ({"type": "Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": [3]}, "argument 'kernel_size'"),
        ({"type": "Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 0}, "argument 'kernel_size'"),
        (
            {"type": "Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding_mode": "mirror"},
            "argument 'padding_mode'",
        ),
        (
            {"type": "Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": "full"},
            "argument 'padding'",
        ),
        ({"type": "Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 3, "groups": 2}, "divisible"),
        (
            {"type": "Conv2d", "in_channels": 2, "out_channels": 2, "kernel_size": 3, "stride": 2, "padding": "same"},
            "stride",
        ),
        ({"type": "Dropout", "p": 1.5}, "argument 'p'"),
        ({"type": "BatchNorm2d", "num_features": 4, "eps": 0}, "argument 'eps'"),
        ({"type": "LogSoftmax", "dim": "1"}, "argument 'dim'"),
        ({"type": "GELU", "approximate": "erf"}, "argument 'approximate'"),
        ({"type": "ReLU", "negative_slope": 0.1}, "unexpected argument 'negative_slope'"),
        ({"type": "Identity", "x": 1}, "unexpected argument 'x'"),
        ({"type": "Sequential"}, "'layers'"),
        ({"type": "Sequential", "layers": [], "extra": 1}, "unexpected"),
        ({"type": "Sequential", "layers": [{"type": "ReLU"}], "names": ["a.b"]}, "'names'"),
        ({"type": "Sequential", "layers": [{"type": "ReLU"}] * 2, "names": ["a", "a"]}, "duplicates"),
        ({"layers": []}, "'type'"),
        ({"type": 3}, "'type'"),
    ],
)
def test_bad_args(layer: dict, needle: str) -> None:
    spec = {"type": "Sequential", "layers": [{"type": "ReLU"}, layer]}
    with pytest.raises(SpecError) as info:
        spec_to_module(spec)
    assert needle in str(info.value)
    assert "spec.layers[1]" in str(info.value)


def test_param_cap_checked_before_allocating() -> None:
    # 10^12 elements would need 4 TB: only a check before allocating can pass this test
    with pytest.raises(SpecError, match="parameter"):
        spec_to_module({"type": "Linear", "in_features": 1_000_000, "out_features": 1_000_000})
    huge_conv = {"type": "Conv2d", "in_channels": 100_000, "out_channels": 100_000, "kernel_size": 100}
    with pytest.raises(SpecError, match="max_params"):
        spec_to_module(huge_conv)
    assert spec_param_count(huge_conv) == 100_000 * 100_000 * 100 * 100 + 100_000


def test_param_cap_boundary() -> None:
    spec = module_to_spec(tutorial_mlp())
    n = n_elements(tutorial_mlp())
    assert spec_param_count(spec) == n
    assert n_elements(spec_to_module(spec, max_params=n)) == n
    with pytest.raises(SpecError, match=str(n)):
        spec_to_module(spec, max_params=n - 1)
    bn = {"type": "BatchNorm2d", "num_features": 10}
    assert spec_param_count(bn) == n_elements(nn.BatchNorm2d(10)) == 41


def _nest(depth: int) -> dict:
    spec: dict = {"type": "ReLU"}
    for _ in range(depth):
        spec = {"type": "Sequential", "layers": [spec]}
    return spec


def test_depth_limit() -> None:
    ok = _nest(MAX_SPEC_DEPTH // 2 - 1)
    spec_to_module(ok)
    with pytest.raises(SpecError, match="deeper"):
        spec_to_module(_nest(MAX_SPEC_DEPTH))
    with pytest.raises(SpecError):
        spec_from_json(json.dumps(_nest(200)))
    with pytest.raises(SpecError):
        spec_from_json("[" * 100_000 + "]" * 100_000)


def test_layer_count_limit() -> None:
    spec_to_module({"type": "Sequential", "layers": [{"type": "ReLU"}] * (MAX_SPEC_LAYERS - 1)})
    with pytest.raises(SpecError, match="layers"):
        spec_to_module({"type": "Sequential", "layers": [{"type": "ReLU"}] * MAX_SPEC_LAYERS})
    many = {"type": "Sequential", "layers": [{"type": "Sequential", "layers": [{"type": "ReLU"}] * 1000}] * 4}
    with pytest.raises(SpecError, match="layers"):
        spec_to_module(many)


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        (3, 3),
        {3, 4},
        b"bytes",
        object(),
        torch.tensor(1.0),
        2**70,
        "x" * 1000,
        lambda: None,
        nn.ReLU,
    ],
    ids=["nan", "inf", "tuple", "set", "bytes", "object", "tensor", "bigint", "longstr", "lambda", "class"],
)
def test_only_plain_json_values(value: object) -> None:
    spec = {"type": "Sequential", "layers": [{"type": "MaxPool2d", "kernel_size": value}]}
    with pytest.raises(SpecError):
        spec_to_module(spec)
    with pytest.raises(SpecError):
        validate_spec(spec)
    with pytest.raises(SpecError):
        spec_to_json(spec)


def test_non_string_keys_rejected() -> None:
    with pytest.raises(SpecError, match="keys"):
        spec_to_module({"type": "Linear", 1: 2})


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "Dropout", "p": NaN}',
        '{"type": "Dropout", "p": Infinity}',
        '{"type": "Dropout", "p": 1e999}',
        '[{"type": "ReLU"}]',
        '{"type": "ReLU"',
        "",
        "null",
        '{"type": "ReLU", "inplace": ' + "9" * 5000 + "}",
        b"\xff\xfe",
    ],
)
def test_bad_json_text(text: str) -> None:
    with pytest.raises(SpecError):
        spec_from_json(text)


def test_json_text_round_trip_is_stable() -> None:
    spec = module_to_spec(small_cnn())
    text = spec_to_json(spec)
    assert spec_from_json(text) == spec
    assert spec_to_json(spec_from_json(text)) == text
    assert spec_from_json(text.encode()) == spec


# ----------------------------------------------------------------------------- custom layers


class Scale(nn.Module):
    """A layer the codec does not know: multiplies by a learned vector."""

    def __init__(self, n: int, init: float = 1.0) -> None:
        super().__init__()
        self.n, self.init = n, init
        self.weight = nn.Parameter(torch.full((n,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


@pytest.fixture
def scale_registered() -> Iterator[None]:
    register_layer("Scale", Scale, to_args=lambda m: {"n": m.n, "init": m.init})
    yield
    unregister_layer("Scale")


def test_custom_layer_round_trip(scale_registered: None) -> None:
    m = nn.Sequential(nn.Linear(4, 3), Scale(3, init=0.5))
    with torch.no_grad():
        m[1].weight.copy_(torch.randn(3))
    spec = module_to_spec(m)
    assert spec["layers"][1] == {"type": "Scale", "n": 3, "init": 0.5}
    m2 = transfer(m)
    x = torch.randn(2, 4)
    assert isinstance(m2[1], Scale) and torch.equal(m(x), m2(x))
    assert spec_param_count(spec) == n_elements(m)


def test_custom_layer_counted_on_meta_device(scale_registered: None) -> None:
    # 10^12 parameters: only a meta-device count (no allocation) can pass this
    with pytest.raises(SpecError, match="parameter"):
        spec_to_module({"type": "Scale", "n": 10**12})


def test_custom_layer_bad_args_name_the_layer(scale_registered: None) -> None:
    with pytest.raises(SpecError, match=r"spec\.layers\[0\] \(Scale\).*colour"):
        spec_to_module({"type": "Sequential", "layers": [{"type": "Scale", "n": 3, "colour": "red"}]})


def test_custom_layer_with_explicit_builders() -> None:
    register_layer(
        "Scale2",
        Scale,
        to_args=lambda m: {"size": m.n},
        from_args=lambda a: Scale(int(a["size"])),
        param_count=lambda a: a["size"],
    )
    try:
        m = spec_to_module({"type": "Scale2", "size": 5})
        assert isinstance(m, Scale) and m.n == 5
        assert module_to_spec(m) == {"type": "Scale2", "size": 5}
        with pytest.raises(SpecError, match="limit"):
            spec_to_module({"type": "Scale2", "size": 10}, max_params=9)
    finally:
        unregister_layer("Scale2")


def test_register_conflicts(scale_registered: None) -> None:
    with pytest.raises(SpecError, match="already registered"):
        register_layer("Scale", Scale, to_args=lambda m: {"n": m.n})
    with pytest.raises(SpecError, match="already registered"):
        register_layer("Scale3", Scale, to_args=lambda m: {"n": m.n})  # same class, other name
    with pytest.raises(SpecError, match="built in"):
        register_layer("Linear", Scale, to_args=lambda m: {})
    with pytest.raises(SpecError, match="built in"):
        unregister_layer("ReLU")
    with pytest.raises(SpecError):
        register_layer("NotAModule", int, to_args=lambda m: {})  # type: ignore[arg-type]
    register_layer("Scale", Scale, to_args=lambda m: {"n": m.n}, replace=True)
    assert module_to_spec(Scale(2)) == {"type": "Scale", "n": 2}


def test_custom_to_args_must_give_json(scale_registered: None) -> None:
    register_layer("Scale", Scale, to_args=lambda m: {"n": torch.tensor(m.n)}, replace=True)
    with pytest.raises(SpecError, match="not a JSON value"):
        module_to_spec(Scale(2))


def test_unregistered_type_unknown_again() -> None:
    register_layer("Tmp", Custom, to_args=lambda m: {})
    assert module_to_spec(Custom()) == {"type": "Tmp"}
    unregister_layer("Tmp")
    with pytest.raises(SpecError, match="unknown layer type 'Tmp'"):
        spec_to_module({"type": "Tmp"})


# ----------------------------------------------------------------------------- fuzz

_json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=8)
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
_arg_names = st.sampled_from(
    [
        "in_features",
        "out_features",
        "bias",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "p",
        "dim",
        "num_features",
        "eps",
        "momentum",
        "affine",
        "in_channels",
        "out_channels",
        "layers",
        "names",
        "start_dim",
        "end_dim",
        "output_size",
        "unflattened_size",
        "padding_mode",
        "approximate",
        "negative_slope",
        "inplace",
    ]
)
_small_values = (
    st.none()
    | st.booleans()
    | st.integers(-3, 40)
    | st.floats(-2, 2)
    | st.sampled_from(["same", "valid", "zeros", "tanh", "none"])
    | st.lists(st.integers(-2, 5), max_size=3)
)


def _layers(types: list[str]) -> st.SearchStrategy:
    leaf = st.builds(
        lambda t, args: {"type": t, **args},
        st.sampled_from(types),
        st.dictionaries(_arg_names, _small_values, max_size=5),
    )
    return st.recursive(
        leaf,
        lambda inner: st.builds(lambda layers: {"type": "Sequential", "layers": layers}, st.lists(inner, max_size=4)),
        max_leaves=8,
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_layers([n for n in registered_layers()]))
def test_fuzz_structured_specs(spec: dict) -> None:
    try:
        m = spec_to_module(spec, max_params=50_000)
    except SpecError as exc:
        assert str(exc)
        return
    assert n_elements(m) <= 50_000
    # whatever builds describes itself, and the description rebuilds the same thing
    again = module_to_spec(m)
    assert module_to_spec(spec_to_module(again)) == again


@settings(max_examples=300, deadline=None)
@given(_json)
def test_fuzz_arbitrary_json(value: object) -> None:
    try:
        spec_to_module(value, max_params=50_000)  # type: ignore[arg-type]
    except SpecError:
        pass
    try:
        spec_from_json(json.dumps(value))
    except SpecError:
        pass


def test_spec_is_not_mutated() -> None:
    spec = {
        "type": "Sequential",
        "layers": [{"type": "Conv2d", "in_channels": 1, "out_channels": 2, "kernel_size": [3, 3]}],
    }
    before = copy.deepcopy(spec)
    spec_to_module(spec)
    assert spec == before
