"""Tests of splitnn.wire.optim_spec.OptimizerSpec."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from splitnn.errors import SpecError
from splitnn.wire import KNOWN_OPTIMIZERS, OptimizerSpec


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 5) -> None:
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(8, 5, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    "spec,reference",
    [
        (OptimizerSpec(), lambda p: torch.optim.SGD(p, lr=0.03)),
        (
            OptimizerSpec("sgd", lr=0.1, momentum=0.9, weight_decay=1e-4),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
        ),
        (OptimizerSpec("adam", lr=1e-3), lambda p: torch.optim.Adam(p, lr=1e-3)),
        (
            OptimizerSpec("adamw", lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01),
            lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01),
        ),
    ],
    ids=["sgd-default", "sgd-momentum", "adam", "adamw"],
)
def test_build_steps_bitwise_like_torch(spec: OptimizerSpec, reference: Callable) -> None:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    b = copy.deepcopy(a)
    initial = copy.deepcopy(a)
    opt = spec.build(a.parameters())
    assert type(opt) is type(reference(nn.Linear(1, 1).parameters()))
    _train(a, opt)
    _train(b, reference(b.parameters()))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, p0) for pa, p0 in zip(a.parameters(), initial.parameters()))  # it trained


def test_default_is_tutorial_sgd() -> None:
    opt = OptimizerSpec().build([nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert group["lr"] == 0.03 and group["momentum"] == 0.0 and group["weight_decay"] == 0.0


def test_build_accepts_param_groups() -> None:
    p1, p2 = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    opt = OptimizerSpec("sgd", lr=0.5).build([{"params": [p1]}, {"params": [p2], "lr": 0.1}])
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1]


@pytest.mark.parametrize(
    "spec",
    [
        OptimizerSpec(),
        OptimizerSpec("adam", lr=2e-4, betas=(0.5, 0.9)),
        OptimizerSpec("ADAMW", lr=1, weight_decay=0.1, eps=1e-7),
    ],
)
def test_dict_round_trip(spec: OptimizerSpec) -> None:
    d = spec.to_dict()
    assert OptimizerSpec.from_dict(json.loads(json.dumps(d, allow_nan=False))) == spec
    assert OptimizerSpec.coerce(d) == spec


def test_normalises_values() -> None:
    spec = OptimizerSpec("Adam", lr=1, betas=[0.5, 0.9])  # type: ignore[arg-type]
    assert spec.name == "adam" and spec.lr == 1.0 and isinstance(spec.lr, float) and spec.betas == (0.5, 0.9)
    assert hash(spec) == hash(OptimizerSpec("adam", lr=1.0, betas=(0.5, 0.9)))


def test_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        OptimizerSpec().lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("sgd", OptimizerSpec()),
        ("SGD", OptimizerSpec()),
        ("sgd:lr=0.03,momentum=0.9", OptimizerSpec(momentum=0.9)),
        (" sgd : lr = 0.1 , weight_decay=5e-4 ", OptimizerSpec(lr=0.1, weight_decay=5e-4)),
        ("adam:lr=1e-3,betas=(0.9,0.99)", OptimizerSpec("adam", lr=1e-3, betas=(0.9, 0.99))),
        ("adam:betas=[0.5, 0.9],eps=1e-6", OptimizerSpec("adam", betas=(0.5, 0.9), eps=1e-6)),
        ("adamw:betas=0.8/0.9", OptimizerSpec("adamw", betas=(0.8, 0.9))),
    ],
)
def test_coerce_strings(text: str, expected: OptimizerSpec) -> None:
    assert OptimizerSpec.coerce(text) == expected


def test_coerce_passthrough_and_none() -> None:
    spec = OptimizerSpec("adam")
    assert OptimizerSpec.coerce(spec) is spec
    assert OptimizerSpec.coerce(None) == OptimizerSpec()


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(KNOWN_OPTIMIZERS),
    lr=st.floats(1e-8, 10, exclude_min=False),
    momentum=st.floats(0, 0.99),
    weight_decay=st.floats(0, 1),
    b1=st.floats(0, 0.999),
    b2=st.floats(0, 0.9999),
    eps=st.floats(1e-12, 1e-2),
)
def test_string_form_round_trips(name, lr, momentum, weight_decay, b1, b2, eps) -> None:  # type: ignore[no-untyped-def]
    spec = OptimizerSpec(
        name, lr=lr, momentum=momentum if name == "sgd" else 0.0, weight_decay=weight_decay, betas=(b1, b2), eps=eps
    )
    assert OptimizerSpec.coerce(str(spec)) == spec
    assert OptimizerSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "value,needle",
    [
        ("rmsprop", "known optimizers: sgd, adam, adamw"),
        ({"name": "lbfgs"}, "known optimizers"),
        ("sgd:lr=0", "'lr' must be > 0"),
        ("sgd:lr=-0.1", "'lr' must be > 0"),
        ("sgd:lr=nan", "'lr' must be finite"),
        ("sgd:lr=inf", "'lr' must be finite"),
        ("sgd:lr=fast", "'lr' must be a number"),
        ({"lr": True}, "'lr' must be a number"),
        ({"lr": "0.1"}, "'lr' must be a number"),
        ("sgd:momentum=-1", "'momentum'"),
        ("adam:momentum=0.9", "sgd only"),
        ("sgd:weight_decay=-1", "'weight_decay'"),
        ("adam:betas=(0.9)", "'betas'"),
        ("adam:betas=(0.9,1.0)", "'betas'"),
        ({"betas": "0.9,0.99"}, "'betas'"),
        ("adam:eps=0", "'eps'"),
        ("sgd:lr=1e308", "'lr' must be at most 10"),
        ("sgd:lr=10.5", "'lr' must be at most 10"),
        ("sgd:momentum=1e308", "'momentum' must lie in [0, 1)"),
        ("sgd:momentum=1", "'momentum' must lie in [0, 1)"),
        ("sgd:weight_decay=1.5", "'weight_decay' must lie in [0, 1]"),
        ("adam:eps=2", "'eps' must lie in (0, 1]"),
        ("sgd:nesterov=1", "unknown optimizer option 'nesterov'"),
        ({"name": "sgd", "foo": 1}, "unknown optimizer option 'foo'"),
        ("sgd:lr", "key=value"),
        ("sgd:lr=0.1,lr=0.2", "twice"),
        ("sgd:" + "x" * 2000, "at most"),
        (3.0, "cannot make an optimizer spec"),
        ([("name", "sgd")], "cannot make an optimizer spec"),
    ],
)
def test_errors(value: object, needle: str) -> None:
    with pytest.raises(SpecError) as info:
        OptimizerSpec.coerce(value)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_unknown_name_via_constructor() -> None:
    with pytest.raises(SpecError, match="sgd, adam, adamw"):
        OptimizerSpec("adagrad")
    with pytest.raises(SpecError):
        OptimizerSpec(name=None)  # type: ignore[arg-type]


def test_schedule_and_decay_rule_travel_as_data_and_are_checked():
    spec = OptimizerSpec.parse(
        "adamw:lr=0.001,betas=(0.9,0.99),weight_decay=0.1,decay=matrices,schedule=cosine,warmup=100,total=2000,min_lr=1e-4"
    )
    assert OptimizerSpec.from_dict(spec.to_dict()) == spec == OptimizerSpec.parse(str(spec))
    assert spec.lr_at(0) == 0.001 * 1 / 101 and spec.lr_at(100) == 0.001 and spec.lr_at(5000) == 1e-4
    w, b = nn.Parameter(torch.zeros(3, 3)), nn.Parameter(torch.zeros(3))
    opt = spec.build([w, b])
    assert [(g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [(0.1, 1), (0.0, 1)]
    for bad, rule in [
        ({"schedule": "cosine", "warmup": 10, "total": 5}, "give total > warmup"),
        ({"decay": "biases"}, "'decay' must be one of"),
        ({"schedule": "step"}, "'schedule' must be one of"),
        ({"warmup": 1.5}, "whole number of steps"),
        ({"min_lr": 1.0, "lr": 0.1}, "'min_lr' must lie in"),
    ]:
        with pytest.raises(SpecError, match=rule):
            OptimizerSpec.from_dict({"name": "adamw", **bad})
