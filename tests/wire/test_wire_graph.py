"""fx segments as data (splitnn.wire.graph) and trusted imports (splitnn.wire.trust): round trips, refusals,
and a fuzzed decoder that only ever raises SpecError."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

import splitnn
from splitnn.errors import SpecError, TrustError
from splitnn.wire import Trust, module_to_spec, spec_from_json, spec_to_json, spec_to_module
from splitnn.wire.graph import GETATTR_NAMES, MAX_GRAPH_NODES, allowed_functions, allowed_methods
from tests.cut_models import BasicBlock, Masked, SkipTwo, SmallResNet
from tests.helpers import write_trust_packages

TRUST = Trust(["tests.cut_models"])


def transfer(m: nn.Module, trust: Trust | None = None) -> nn.Module:
    """What a worker does: the spec as JSON text, the weights as a state dict."""
    m2 = spec_to_module(spec_from_json(spec_to_json(module_to_spec(m))), trust=trust)
    m2.load_state_dict(m.state_dict())
    return m2


def run(segments, *inputs):
    value = inputs if len(inputs) > 1 else inputs[0]
    for seg in segments:
        value = seg(*value) if isinstance(value, tuple) else seg(value)
    return value


@pytest.mark.parametrize(
    "make,at,inputs,leaves",
    [
        (SmallResNet, ["layer1.1.conv2", "layer2.0.bn1"], lambda: (torch.randn(2, 1, 12, 12),), ()),
        (SmallResNet, ["layer1.1", "layer2"], lambda: (torch.randn(2, 1, 12, 12),), (BasicBlock,)),
        (SkipTwo, ["mid", "head"], lambda: (torch.randn(3, 20),), ()),
        (Masked, ["table"], lambda: (torch.randn(3, 20), (torch.rand(3, 16) > 0.5).float()), ()),
    ],
    ids=["resnet-inside-blocks", "resnet-blocks-as-imports", "slices", "two-inputs-int-index"],
)
def test_cut_segments_round_trip_through_json(make, at, inputs, leaves):
    torch.manual_seed(0)
    model = make().eval()
    segments = splitnn.cut(model, at=at, leaves=leaves)
    copies = [transfer(s, TRUST).eval() for s in segments]
    for s, c in zip(segments, copies):
        assert isinstance(c, fx.GraphModule)
        assert list(c.state_dict()) == list(s.state_dict())  # the original names
    x = inputs()
    assert torch.equal(run(copies, *x), model(*x))


def test_graph_spec_is_plain_data():
    seg = splitnn.cut(SmallResNet(), at=["layer1.1.conv2"])[1]
    spec = module_to_spec(seg)
    assert spec["type"] == "Graph"
    assert {n["op"] for n in spec["nodes"]} == {"placeholder", "call_module", "call_function", "call_method", "output"}
    assert {n["target"] for n in spec["nodes"] if n["op"] == "call_function"} == {
        "operator.add",
        "torch.nn.functional.relu",
        "torch.nn.functional.adaptive_avg_pool2d",
        "torch.nn.functional.log_softmax",
    }
    assert {n["target"] for n in spec["nodes"] if n["op"] == "call_method"} == {"flatten"}
    assert spec["modules"]["layer1.1.conv2"]["type"] == "Conv2d"
    assert json.loads(spec_to_json(spec)) == spec


def test_collected_model_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = SmallResNet().eval()
    split = splitnn.SplitNN(
        splitnn.cut(model, at=["layer1.1", "layer2"], leaves=[BasicBlock]),
        [splitnn.VirtualWorker(n) for n in ("alice", "bob", "claire")],
    )
    collected = split.collect().eval()
    path = splitnn.save_model(collected, tmp_path / "m.safetensors")
    with pytest.raises(TrustError, match=r"tests\.cut_models\.BasicBlock.*--trust tests\.cut_models"):
        splitnn.load_model(path)
    loaded = splitnn.load_model(path, trust=["tests.cut_models"]).eval()
    x = torch.randn(2, 1, 12, 12)
    assert torch.equal(loaded(x), model(x))
    model.load_state_dict(loaded.state_dict())  # the original names: loads into the user's model


# ----------------------------------------------------------------------------- trust


def test_untrusted_import_is_refused_before_anything_is_imported():
    spec = {
        "type": "Sequential",
        "layers": [{"type": "ReLU"}, {"import": "tests.untrusted_canary:Thing", "kwargs": {}}],
    }
    sys.modules.pop("tests.untrusted_canary", None)
    with pytest.raises(TrustError) as e:
        spec_to_module(spec)
    assert "tests.untrusted_canary.Thing" in str(e.value) and "splitnn worker --trust tests.untrusted_canary" in str(
        e.value
    )
    assert "tests.untrusted_canary" not in sys.modules
    with pytest.raises(TrustError):  # a prefix is a module path, not a string prefix
        spec_to_module(spec, trust=Trust(["tests.untrusted"]))
    built = spec_to_module(spec, trust=Trust(["tests"]))
    assert type(built[1]).__name__ == "Thing" and built[1].n == 2


def test_torch_nn_layers_outside_the_registry_are_trusted_by_default():
    m = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2), nn.LayerNorm([3, 4]), nn.Embedding(5, 2))
    spec = module_to_spec(m)
    assert spec["layers"][0]["import"] == "torch.nn.modules.conv:Conv1d"
    m2 = spec_to_module(spec_from_json(spec_to_json(spec)))
    assert [type(x) for x in m2] == [nn.Conv1d, nn.LayerNorm, nn.Embedding]
    assert {k: v.shape for k, v in m2.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


@pytest.mark.parametrize(
    "ref,needle",
    [
        ("os:system", "not trusted"),
        ("os.path:join", "not trusted"),
        ("builtins:eval", "not trusted"),
        ("torch.nn.modules:__class__", "'import' must be"),
        ("torch.nn.modules.linear:Linear.__init__", "'import' must be"),
        ("no colon", "'import' must be"),
        ("torch.nn.modules.linear:F", "not trusted"),
        ("torch.nn.modules.linear:Nope", "not trusted"),
        ("torch.nn.modules.module:torch.ao.quantization.observer.NoopObserver", "not an attribute chain"),
        ("torch.nn.modules.module:Module", "not trusted"),  # under torch.nn.modules, but not a default layer
        ("torch.nn.modules:Linear", "not trusted"),  # a re-export: the layer's own module is torch.nn.modules.linear
        ("torch.ao.quantization.observer:NoopObserver", "not trusted"),
    ],
)
def test_import_refs_are_checked(ref, needle):
    with pytest.raises(SpecError, match=needle):
        spec_to_module({"import": ref, "kwargs": {}})


@pytest.mark.parametrize(
    "ref,needle",
    [
        ("torch.nn.modules.linear:F", "not an nn.Module class"),
        ("torch.nn.modules.linear:Nope", "has no 'Nope'"),
    ],
)
def test_trusted_refs_must_name_a_class_defined_there(ref, needle):
    with pytest.raises(SpecError, match=needle):
        spec_to_module({"import": ref, "kwargs": {}}, trust=Trust(["torch.nn.modules"]))
    lin = {"import": "torch.nn.modules.linear:Linear", "kwargs": {"in_features": 2, "out_features": 2}}
    assert type(spec_to_module(lin)) is nn.Linear  # a default layer, by its own module


def test_trust_means_the_classes_own_module(tmp_path, monkeypatch):
    write_trust_packages(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    trust, dropped = Trust(["mypkg.models"]), tmp_path / "pwned"
    for ref, needle in (
        ("mypkg.models:evilpkg.Dropper", "not an attribute chain"),
        ("mypkg.models:Reexported", "the class found is evilpkg.Dropper, defined outside what this party trusts"),
        ("evilpkg:Dropper", "not trusted"),
    ):
        with pytest.raises(TrustError, match=needle):
            spec_to_module({"import": ref, "kwargs": {"path": str(dropped)}}, trust=trust)
        assert not dropped.exists(), ref
    built = spec_to_module({"import": "mypkg.models:Good", "kwargs": {"n": 3}}, trust=trust)
    assert type(built).__module__ == "mypkg.models" and built.n == 3
    for m in ("mypkg", "mypkg.models", "evilpkg"):
        sys.modules.pop(m, None)


def test_import_kwargs_are_json_and_checked_when_described():
    class Odd(nn.Module):  # keeps no attribute for its constructor argument
        def __init__(self, n: int) -> None:
            super().__init__()
            self.lin = nn.Linear(n, n)

    Odd.__module__, Odd.__qualname__ = "tests.cut_models", "Odd"
    with pytest.raises(SpecError, match=r"constructor argument 'n'.*splitnn_kwargs"):
        module_to_spec(Odd(3))
    Odd.splitnn_kwargs = lambda self: {"n": 4}  # a wrong description is caught by rebuilding it
    with pytest.raises(SpecError, match=r"does not rebuild this module"):
        module_to_spec(Odd(3))
    with pytest.raises(SpecError, match="kwargs.n is an object"):
        spec_to_module({"import": "tests.cut_models:BasicBlock", "kwargs": {"n": {"a": 1}}}, trust=TRUST)


# ----------------------------------------------------------------------------- refusals


def _graph(nodes, modules=None, attrs=None):
    return {"type": "Graph", "modules": modules or {}, "attrs": attrs or {}, "nodes": nodes}


PH, OUT0 = {"op": "placeholder"}, {"op": "output", "args": [{"node": 0}]}


def _fn(target, *args, **kwargs):
    return {"op": "call_function", "target": target, "args": list(args), "kwargs": kwargs}


@pytest.mark.parametrize(
    "spec,needle",
    [
        (_graph([PH, {"op": "exec", "target": "x"}, OUT0]), "unknown op 'exec'"),
        (_graph([PH, _fn("torch.relu", {"node": 2}), {"op": "output", "args": [{"node": 1}]}]), "earlier node"),
        (_graph([PH, _fn("torch.relu", {"node": 1}), {"op": "output", "args": [{"node": 1}]}]), "earlier node"),
        (_graph([PH, _fn("torch.relu", {"node": -1}), OUT0]), "earlier node"),
        (_graph([PH, _fn("os.system", "ls"), OUT0]), "'os.system' is not on the allow-list"),
        (_graph([PH, _fn("builtins.eval", "1"), OUT0]), "not on the allow-list"),
        (_graph([PH, _fn("torch.load", "f"), OUT0]), "not on the allow-list"),
        (_graph([PH, _fn("torch.from_file", "f"), OUT0]), "not on the allow-list"),
        (_graph([PH, _fn("getattr", {"node": 0}, "__class__"), OUT0]), "getattr may only read"),
        (_graph([PH, _fn("torch.relu", {"node": 0}, **{"x=1)\nimport os\n(": 1}), OUT0]), "not a plain identifier"),
        (
            _graph([PH, {"op": "call_method", "target": "register_hook", "args": [{"node": 0}], "kwargs": {}}, OUT0]),
            "'register_hook' is not on the allow-list",
        ),
        (
            _graph([PH, {"op": "call_method", "target": "__reduce_ex__", "args": [{"node": 0}], "kwargs": {}}, OUT0]),
            "not on the allow-list",
        ),
        (
            _graph(
                [PH, {"op": "call_module", "target": "forward", "args": [{"node": 0}], "kwargs": {}}, OUT0],
                {"forward": {"type": "ReLU"}},
            ),
            "may not name an attribute",
        ),
        (_graph([PH, {"op": "call_module", "target": "m", "args": [], "kwargs": {}}, OUT0]), "not declared"),
        (_graph([PH, OUT0], {"m": {"type": "ReLU"}}), "'m' is declared but no node uses it"),
        (_graph([PH, OUT0, OUT0]), "exactly one 'output'"),
        (_graph([PH, _fn("torch.relu", {"node": 0}), PH, OUT0]), "placeholders"),
        (_graph([{"op": "placeholder", "default": {"node": 0}}, OUT0]), "earlier node"),
        (_graph([PH, _fn("torch.relu", {"tuple": 1}), OUT0]), "one key of"),
        (_graph([PH, _fn("torch.relu", {"dtype": ["float32"]}), OUT0]), "unknown dtype"),
        (
            _graph(
                [PH, {"op": "get_attr", "target": "w"}, OUT0],
                attrs={
                    "w": {"kind": "parameter", "shape": [100000, 100000], "dtype": "float32", "requires_grad": True}
                },
            ),
            "limit is",
        ),
        (
            _graph(
                [PH, {"op": "get_attr", "target": "w"}, OUT0],
                attrs={"w": {"kind": "buffer", "shape": [-1], "dtype": "float32", "requires_grad": False}},
            ),
            "shape must be",
        ),
        (
            _graph(
                [
                    PH,
                    {"op": "call_module", "target": "a", "args": [], "kwargs": {}},
                    {"op": "get_attr", "target": "a.w"},
                ]
                + [OUT0],
                {"a": {"type": "ReLU"}},
                {"a.w": {"kind": "buffer", "shape": [1], "dtype": "float32", "requires_grad": False}},
            ),
            "lies inside",
        ),
        (_graph([PH] * (MAX_GRAPH_NODES + 1)), "list longer than"),
        (_graph([]), "1 to"),
        (
            _graph(
                [PH, {"op": "call_module", "target": "b", "args": [{"node": 0}], "kwargs": {}}, OUT0],
                {"b": {"import": "tests.untrusted_canary:Thing", "kwargs": {}}},
            ),
            "not trusted",
        ),
    ],
)
def test_malformed_graphs_are_refused(spec, needle):
    with pytest.raises(SpecError, match=needle):
        spec_to_module(spec_from_json(json.dumps(spec)))


def test_functions_off_the_allow_list_are_not_described():
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.Tensor.add, (x, x)))
    with pytest.raises(SpecError, match=r"nodes\[1\].*not on the allow-list.*leaves=.*--trust"):
        module_to_spec(fx.GraphModule(nn.Module(), g))


def test_allow_lists_hold_no_escape_hatches():
    names = set(allowed_functions())
    assert {"torch.relu", "torch.cat", "torch.nn.functional.relu", "operator.add", "operator.getitem"} <= names
    for bad in ("torch.load", "torch.save", "torch.from_file", "torch.compile", "torch.manual_seed", "eval", "exec"):
        assert bad not in names
    assert not [n for n in names if n.split(".")[-1].startswith("_")]
    methods = allowed_methods()
    assert {"flatten", "view", "size", "add", "contiguous"} <= methods
    assert not {"register_hook", "apply_", "map_", "numpy", "storage", "backward", "item", "tolist"} & methods
    assert not [m for m in methods if m.startswith("_")]
    assert "__class__" not in GETATTR_NAMES


def test_the_vocabulary_is_dense_functional_and_initialised():
    """No in-place writes, no uninitialised memory, no sparse/nested/segment/quantized ops, no pointers."""
    names = {n.rsplit(".", 1)[-1] for n in allowed_functions()} | set(allowed_methods())
    assert not [n for n in names if n.endswith("_") and not n.endswith("and_") and not n.endswith("or_")]
    assert not [n for n in names if n.startswith("i") and f"operator.{n}" in allowed_functions() and n != "invert"]
    for word in ("empty", "sparse", "nested", "segment", "quantize", "storage", "ptr", "strided", "set_", "resize"):
        assert not [n for n in names if word in n], word
    for bad in ("setitem", "native_batch_norm", "batch_norm", "nonzero", "unique", "masked_select", "from_file"):
        assert bad not in names


@pytest.mark.parametrize(
    "node,needle",
    [
        (_fn("torch.empty", 4), "'torch.empty' is not on the allow-list"),
        (_fn("torch.sparse_coo_tensor", {"list": [[0]]}, {"list": [1.0]}), "'torch.sparse_coo_tensor' is not on"),
        (_fn("torch.segment_reduce", {"node": 0}, "sum"), "'torch.segment_reduce' is not on"),
        (_fn("torch.native_batch_norm", {"node": 0}), "'torch.native_batch_norm' is not on"),
        (_fn("operator.iadd", {"node": 0}, 1), "'operator.iadd' is not on"),
        (_fn("operator.setitem", {"node": 0}, 0, 1.0), "'operator.setitem' is not on"),
        (_fn("torch.add", {"node": 0}, 1, out={"node": 0}), "'torch.add' with out="),
        (_fn("torch.nn.functional.relu", {"node": 0}, inplace=True), "inplace=True.*pass inplace=False"),
        (_fn("torch.nn.functional.relu", {"node": 0}, True), "inplace=True"),
        (_fn("torch.nn.functional.dropout", {"node": 0}, 0.5, True, True), "inplace=True"),
        (_fn("torch.nn.functional.embedding", {"node": 0}, {"node": 0}, max_norm=1.0), "max_norm=1.0 writes"),
        ({"op": "call_method", "target": "add_", "args": [{"node": 0}, 1], "kwargs": {}}, "'add_' is not on"),
        ({"op": "call_method", "target": "const_data_ptr", "args": [{"node": 0}], "kwargs": {}}, "not on the"),
        ({"op": "call_method", "target": "new_empty", "args": [{"node": 0}, [2]], "kwargs": {}}, "not on the"),
        ({"op": "call_method", "target": "as_strided", "args": [{"node": 0}, [2], [1]], "kwargs": {}}, "not on"),
        ({"op": "call_method", "target": "add", "args": [{"node": 0}, 1], "kwargs": {"out": {"node": 0}}}, "out="),
        ({"op": "call_method", "target": "split", "args": ["a b", " "], "kwargs": {}}, "the value it is called on"),
    ],
)
def test_ops_outside_the_vocabulary_are_refused_with_their_name(node, needle):
    with pytest.raises(SpecError, match=r"nodes\[1\]: .*" + needle):
        spec_to_module(spec_from_json(json.dumps(_graph([PH, node, {"op": "output", "args": [{"node": 1}]}]))))


def test_sender_refuses_what_the_receiver_refuses():
    for build in (
        lambda g, x: g.call_function(torch.nn.functional.relu, (x,), {"inplace": True}),
        lambda g, x: g.call_method("add_", (x, x)),
        lambda g, x: g.call_function(torch.empty, (3,)),
        lambda g, x: g.call_function(torch.add, (x, x), {"out": x}),
    ):
        g = fx.Graph()
        x = g.placeholder("x")
        g.output(build(g, x))
        with pytest.raises(SpecError, match=r"nodes\[1\].*(not on the allow-list|inplace=True|out=)"):
            module_to_spec(fx.GraphModule(nn.Module(), g))


# ----------------------------------------------------------------------------- fuzz

_leaf = st.none() | st.booleans() | st.integers(-3, 12) | st.floats(-2, 2) | st.text(max_size=6)
_special = (
    st.builds(lambda i: {"node": i}, st.integers(-2, 12) | st.text(max_size=2))
    | st.builds(lambda d: {"dtype": d}, st.sampled_from(["float32", "int64", "bogus", 3]))
    | st.builds(lambda f: {"float": f}, st.sampled_from(["inf", "-inf", "nan", "1e9", 1]))
    | st.just({"ellipsis": True})
    | st.builds(lambda d: {"device": d}, st.sampled_from(["cpu", "cuda:0", "meta", "disk", "cuda:123", 3]))
    | st.builds(lambda k: {"layout": k}, st.sampled_from(["strided", "sparse_coo", None]))
)
_value = st.recursive(
    _leaf | _special,
    lambda c: (
        st.lists(c, max_size=3)
        | st.builds(lambda v: {"list": v}, st.lists(c, max_size=3))
        | st.builds(lambda v: {"slice": v}, st.lists(c, max_size=4))
        | st.dictionaries(st.text(max_size=4), c, max_size=2)
    ),
    max_leaves=6,
)
_target = st.sampled_from(
    [
        "torch.relu",
        "operator.add",
        "operator.getitem",
        "torch.nn.functional.linear",
        "getattr",
        "torch.cat",
        "flatten",
        "view",
        "size",
        "lin",
        "w",
        "a.b",
        "forward",
        "__class__",
        "os.system",
        "torch.load",
        "aten.add.Tensor",
        "aten.add_.Tensor",
        "aten.arange.default",
        "aten.embedding.default",
        "aten.view.default",
        "aten.sym_size.int",
    ]
) | st.text(max_size=12)
_node = st.fixed_dictionaries(
    {"op": st.sampled_from(["placeholder", "get_attr", "call_module", "call_function", "call_method", "output", "x"])},
    optional={
        "target": _target,
        "args": st.lists(_value, max_size=3) | _value,
        "kwargs": st.dictionaries(
            st.sampled_from(["dim", "inplace", "x y", "_s", "__x"]) | st.text(max_size=4), _value
        ),
        "default": _value,
    },
)
_graphs = st.fixed_dictionaries(
    {"type": st.just("Graph"), "nodes": st.lists(_node, max_size=8)},
    optional={
        "modules": st.dictionaries(
            st.sampled_from(["lin", "a.b", "forward", "x", "_modules", "a..b"]),
            st.just({"type": "Linear", "in_features": 3, "out_features": 3}) | st.just({"type": "ReLU"}) | _value,
            max_size=2,
        ),
        "attrs": st.dictionaries(
            st.sampled_from(["w", "a.b", "training"]),
            st.fixed_dictionaries(
                {
                    "kind": st.sampled_from(["parameter", "buffer", "constant", "x"]),
                    "shape": st.lists(st.integers(-1, 4), max_size=3) | _value,
                    "dtype": st.sampled_from(["float32", "int64", "bool", "nope"]) | _value,
                    "requires_grad": st.booleans() | _value,
                },
                optional={
                    "values": st.lists(st.integers(-2, 3) | st.floats(-1, 1) | st.booleans(), max_size=4) | _value
                },
            )
            | _value,
            max_size=2,
        ),
    },
)

_FUNCTIONS = [
    "torch.relu",
    "operator.add",
    "operator.getitem",
    "torch.cat",
    "torch.nn.functional.linear",
    "getattr",
    "aten.add.Tensor",
    "aten.relu.default",
    "aten.view.default",
    "aten.sym_size.int",
]


@st.composite
def _near_valid_graphs(draw):
    """Graphs that are mostly well formed, so that the checks deep in the decoder and the build run."""
    nodes = [{"op": "placeholder"} for _ in range(draw(st.integers(0, 2)))]
    uses = set()
    for _ in range(draw(st.integers(0, 6))):
        ref = st.builds(lambda j: {"node": j}, st.integers(-1, len(nodes)))  # mostly earlier nodes
        arg = ref | _leaf | st.lists(ref | _leaf, max_size=2) | st.builds(lambda v: {"list": v}, st.lists(ref))
        op = draw(st.sampled_from(["call_function", "call_method", "call_module", "get_attr"]))
        if op == "get_attr":
            uses.add("w")
            nodes.append({"op": op, "target": draw(st.sampled_from(["w", "w", "v"]))})
            continue
        target = {
            "call_function": st.sampled_from(_FUNCTIONS) | _target,
            "call_method": st.sampled_from(["flatten", "view", "size", "add_", "sum", "numpy"]),
            "call_module": st.sampled_from(["lin", "lin", "seq.0"]),
        }[op]
        if op == "call_module":
            uses.add("lin")
        kwargs = st.dictionaries(st.sampled_from(["dim", "inplace", "alpha", "x y"]), _leaf, max_size=1)
        nodes.append(
            {"op": op, "target": draw(target), "args": draw(st.lists(arg, max_size=3)), "kwargs": draw(kwargs)}
        )
    nodes.append(
        {"op": "output", "args": [draw(st.builds(lambda j: {"node": j}, st.integers(0, len(nodes))) | _value)]}
    )
    modules = {"lin": {"type": "Linear", "in_features": 3, "out_features": 3}} if "lin" in uses else {}
    attrs = {"w": {"kind": "parameter", "shape": [3], "dtype": "float32", "requires_grad": True}} if "w" in uses else {}
    return _graph(nodes, modules, attrs)


def _decode(spec, trust=None):
    """Decode and build; a problem may only ever be a SpecError."""
    try:
        return spec_to_module(spec_from_json(json.dumps(spec)), trust=trust)
    except SpecError:
        return None


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_graphs)
def test_fuzzed_graphs_raise_only_spec_errors(spec):
    built = _decode(spec)
    assert built is None or isinstance(built, fx.GraphModule)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_near_valid_graphs())
def test_fuzzed_near_valid_graphs_raise_only_spec_errors(spec):
    built = _decode(spec)
    assert built is None or isinstance(built, fx.GraphModule)


def _paths(v, prefix=()):
    yield prefix
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, (*prefix, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, (*prefix, i))


_SEED = module_to_spec(splitnn.cut(SmallResNet(width=2), at=["layer1.1.conv2", "layer2"])[1])
_SEED_PATHS = [p for p in _paths(_SEED) if p]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_SEED_PATHS), _value | _target | _node), min_size=1, max_size=3))
def test_mutated_segment_specs_raise_only_spec_errors(mutations):
    spec = copy.deepcopy(_SEED)
    for path, value in mutations:
        holder = spec
        try:
            for key in path[:-1]:
                holder = holder[key]
            holder[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    _decode(spec, TRUST)


class _Positions(nn.Module):
    """Embeddings plus positions from a buffer the model does not save: cut through torch.export, its first
    segment is a graph of ATen ops with a constant (the positions travel in the spec)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(7, 4), nn.Embedding(6, 4), nn.Linear(4, 3)
        self.register_buffer("ids", torch.arange(6), persistent=False)

    def forward(self, x):
        return self.head(self.tok(x) + self.pos(self.ids[: x.shape[1]]))


_EXPORTED_SEED = module_to_spec(splitnn.cut(_Positions(), ["head"], example=torch.zeros(2, 5, dtype=torch.long))[0])
_EXPORTED_PATHS = [p for p in _paths(_EXPORTED_SEED) if p]


def test_the_exported_seed_holds_aten_ops_and_a_constant():
    kinds = {a["kind"] for a in _EXPORTED_SEED["attrs"].values()}
    targets = {n.get("target") for n in _EXPORTED_SEED["nodes"]}
    assert "constant" in kinds and "aten.embedding.default" in targets


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_EXPORTED_PATHS), _value | _target | _node), min_size=1, max_size=3))
def test_mutated_exported_segment_specs_raise_only_spec_errors(mutations):
    spec = copy.deepcopy(_EXPORTED_SEED)
    for path, value in mutations:
        holder = spec
        try:
            for key in path[:-1]:
                holder = holder[key]
            holder[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    _decode(spec)
