"""Exported (ATen-level) segments as data: the ATen part of the op vocabulary (splitnn.wire.ops), the values export
graphs hold (devices, layouts, small constants such as position ids), round trips of cut transformers through
JSON, and the refusals that keep it dense and functional, each naming its rule."""

from __future__ import annotations

import json

import pytest
import torch

import splitnn
from splitnn.errors import MemoryBudgetError, SpecError
from splitnn.wire import module_to_spec, spec_from_json, spec_to_json, spec_to_module
from splitnn.wire.budget import guard_segment
from splitnn.wire.graph import MAX_CONSTANT_ELEMENTS
from splitnn.wire.ops import ATEN_OPS, allowed_functions

pytest.importorskip("transformers")
from tests.split import transformer_models as tm  # noqa: E402


def _fn(target, *args, **kwargs):
    return {"op": "call_function", "target": target, "args": list(args), "kwargs": kwargs}


def _graph(*nodes, attrs=None, inputs=1):
    ph = [{"op": "placeholder"} for _ in range(inputs)]
    last = inputs + len(nodes) - 1
    return {
        "type": "Graph",
        "modules": {},
        "attrs": attrs or {},
        "nodes": [*ph, *nodes, {"op": "output", "args": [{"node": last}]}],
    }


def _build(spec, budget=1 << 20):
    spec = spec_from_json(json.dumps(spec))
    module = spec_to_module(spec)
    with torch.device("meta"):
        twin = spec_to_module(spec)
    guard_segment(module, twin, budget, "spec")
    return module


def test_every_aten_op_of_the_vocabulary_is_an_overload_that_writes_nothing():
    """The oracle reads each schema itself: no argument written (alias with '!'), no out, no mutable schema."""
    functions = allowed_functions()
    for name in ATEN_OPS:
        fn = functions[name]  # every listed overload exists in this torch
        assert isinstance(fn, torch._ops.OpOverload) and f"aten.{fn._opname}.{fn._overloadname}" == name
        text = str(fn._schema)
        assert "!" not in text and " out" not in text and not fn._schema.is_mutable, name
    for bad in ("add_", "copy_", "index_put_", "empty", "empty_strided", "as_strided", "nonzero", "native_batch_norm"):
        assert not [n for n in ATEN_OPS if n.split(".")[1] == bad], bad


@pytest.mark.parametrize(
    "node,needle",
    [
        (_fn("aten.add_.Tensor", {"node": 0}, {"node": 0}), "'aten.add_.Tensor' is not on the allow-list"),
        (_fn("aten.empty.memory_format", [2]), "'aten.empty.memory_format' is not on the allow-list"),
        (_fn("aten.nonzero.default", {"node": 0}), "'aten.nonzero.default' is not on the allow-list"),
        (_fn("aten.add.out", {"node": 0}, {"node": 0}), "'aten.add.out' is not on the allow-list"),
        (_fn("aten.add.Tensor", {"node": 0}, {"node": 0}, out={"node": 0}), "'aten.add.Tensor' with out="),
        (_fn("aten.embedding.default", {"node": 0}, {"node": 0}, -1, False, True), "sparse=True makes sparse"),
        (_fn("aten.relu.default", {"node": 0}, inplace=True), "has no argument 'inplace'"),
        (_fn("aten.relu.default", {"node": 0}, 1, 2), "takes at most 1 positional"),
        (_fn("aten.arange.default", 4, device={"device": "disk"}), "'device' is 'cpu', 'cuda', 'cuda:N' or 'meta'"),
        (_fn("aten.arange.default", 4, layout={"layout": "sparse_coo"}), "'layout' is 'strided'"),
    ],
)
def test_aten_calls_that_write_allocate_uninitialised_or_go_sparse_are_refused(node, needle):
    with pytest.raises(SpecError, match=needle):
        _build(_graph(node))


def test_an_aten_graph_with_devices_and_layouts_runs():
    out = _build(
        _graph(
            _fn(
                "aten.arange.default",
                4,
                dtype={"dtype": "int64"},
                layout={"layout": "strided"},
                device={"device": "cpu"},
            ),
            _fn("aten.to.dtype_layout", {"node": 1}, dtype={"dtype": "float32"}, device={"device": "cpu"}),
            _fn("aten.add.Tensor", {"node": 0}, {"node": 2}),
        )
    )(torch.ones(4))
    assert torch.equal(out, torch.arange(4.0) + 1)


def test_a_huge_aten_factory_and_a_value_dependent_index_are_refused_before_they_run():
    huge = _build(_graph(_fn("aten.arange.default", 1 << 28, device={"device": "cpu"})))
    with pytest.raises(MemoryBudgetError, match=r"nodes\[1\] \(call_function aten.arange.default\).*1.00 MiB"):
        huge(torch.ones(1))
    masked = _build(_graph(_fn("aten.index.Tensor", {"node": 0}, {"list": [{"node": 1}]}), inputs=2))
    with pytest.raises(MemoryBudgetError, match=r"aten.index.Tensor.*sizes cannot be computed before it runs"):
        masked(torch.arange(4.0), torch.tensor([True, False, True, True]))
    ints = masked(torch.arange(4.0), torch.tensor([3, 0]))  # integer indices: the size follows from the shapes
    assert torch.equal(ints, torch.tensor([3.0, 0.0]))


CONST = {"kind": "constant", "shape": [1, 3], "dtype": "int64", "requires_grad": False, "values": [0, 1, 2]}


def test_a_constant_travels_in_the_spec_and_stays_out_of_the_state_dict():
    m = _build(
        _graph(
            {"op": "get_attr", "target": "pos"}, _fn("aten.add.Tensor", {"node": 0}, {"node": 1}), attrs={"pos": CONST}
        )
    )
    assert torch.equal(m.pos, torch.tensor([[0, 1, 2]])) and "pos" not in m.state_dict()
    assert torch.equal(m(torch.ones(2, 3, dtype=torch.int64)), torch.tensor([[1, 2, 3], [1, 2, 3]]))


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"values": [0, 1]}, "flat list of the 3 elements"),
        ({"values": [0, 1, 2**63]}, "must all be torch.int64 values"),
        ({"values": [0, 1, True]}, "must all be torch.int64 values"),
        ({"dtype": "float32", "values": [0.0, 1.5, 1e400]}, "not a finite number|out of range"),
        ({"requires_grad": True, "dtype": "float32"}, "needs no gradient"),
        ({"shape": [MAX_CONSTANT_ELEMENTS + 1], "values": [0] * (MAX_CONSTANT_ELEMENTS + 1)}, "list longer|at most"),
        ({"kind": "buffer"}, "only a constant does"),
    ],
)
def test_malformed_constants_are_refused(change, needle):
    attrs = {"pos": {**CONST, **change}}
    spec = _graph({"op": "get_attr", "target": "pos"}, _fn("aten.add.Tensor", {"node": 0}, {"node": 1}), attrs=attrs)
    with pytest.raises(SpecError, match=needle):
        spec_to_module(spec_from_json(json.dumps(spec)))


def test_a_large_non_persistent_buffer_is_refused_naming_the_fix():
    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.zeros(MAX_CONSTANT_ELEMENTS + 1), persistent=False)

        def forward(self, x):
            return x + self.table.sum()

    segments = splitnn.cut(torch.nn.Sequential(Big(), torch.nn.Linear(2, 2)), ["1"], example=torch.ones(2, 2))
    with pytest.raises(SpecError, match="'0.table' is not persistent.*Register it as a persistent buffer"):
        module_to_spec(segments[0])


@pytest.mark.parametrize(
    "make,at,keyword",
    [(tm.gpt2, ["transformer.h.1", "transformer.h.3"], "input_ids"), (tm.llama, ["model.layers.2"], "input_ids")],
    ids=["gpt2", "llama-rotary-constants"],
)
def test_cut_transformer_segments_round_trip_through_json_and_the_budget_check(make, at, keyword):
    torch.manual_seed(0)
    model = make()
    ids = torch.randint(0, tm.VOCAB, (5, tm.SEQ), generator=torch.Generator().manual_seed(1))
    segments = splitnn.cut(model, at, example={keyword: ids[:2]})
    x = ids
    for seg in segments:
        spec = spec_from_json(spec_to_json(module_to_spec(seg)))
        calls = [n for n in spec["nodes"] if n["op"] == "call_function"]
        # ATen ops, and the device of the segment's input read where export had written the device it traced on
        assert all(n["target"].startswith(("aten.", "operator.")) or n["target"] == "getattr" for n in calls)
        assert all(n["args"][1] == "device" for n in calls if n["target"] == "getattr")
        assert not list(_device_constants([(n["args"], n["kwargs"]) for n in calls]))  # the graph runs anywhere
        copy = _build(spec, budget=64 << 20)
        copy.load_state_dict(seg.state_dict())
        assert list(copy.state_dict()) == list(seg.state_dict())
        want = seg(x)
        assert torch.equal(copy(x), want)
        x = want
    assert torch.equal(x, model(input_ids=ids).logits)


def _device_constants(x):
    """The ``{"device": ...}`` constants anywhere in a spec's arguments."""
    if isinstance(x, dict):
        if set(x) == {"device"}:
            yield x["device"]
        for v in x.values():
            yield from _device_constants(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _device_constants(v)


class _Attention(torch.nn.Module):
    """nanoGPT's attention: ``y.transpose(1, 2).contiguous().view(...)``. On CPU the attention kernel's output is
    already contiguous once transposed, so export drops ``.contiguous()``; the meta kernel lays it out otherwise."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width), heads

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


def test_a_view_that_export_left_without_contiguous_passes_the_meta_check():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Attention(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8, 16)
    segments = splitnn.cut(model, ["1"], example=x[:2])
    copy = _build(module_to_spec(segments[0]), budget=16 << 20)
    copy.load_state_dict(segments[0].state_dict())
    assert torch.equal(copy(x), model[0](x))  # the view became a reshape: the same values, and no meta failure


def test_a_joined_cut_transformer_saves_and_loads_as_data(tmp_path):
    """splitnn.save_model writes the joined exported graph (ATen ops) and its weights; load_model rebuilds it."""
    torch.manual_seed(0)
    model = tm.gpt2()
    ids = torch.randint(0, tm.VOCAB, (3, tm.SEQ), generator=torch.Generator().manual_seed(2))
    segments = splitnn.cut(model, ["transformer.h.2"], example={"input_ids": ids[:2]})
    split = splitnn.SplitNN(segments, [splitnn.VirtualWorker("a"), splitnn.VirtualWorker("b")])
    splitnn.save_model(split.collect(), tmp_path / "gpt2.safetensors")
    back = splitnn.load_model(tmp_path / "gpt2.safetensors")
    assert torch.equal(back(ids), model(input_ids=ids).logits)
