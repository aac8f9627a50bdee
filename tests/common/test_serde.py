"""splitnn.common.serde and the table of operations: every message decodes to what was encoded, and junk gives
a WireError.

Each message is encoded as the researcher's client does it (a serde pair, or a declared operation of
:mod:`splitnn.common.operations`), sent through JSON (as the command envelope carries its arguments)
and decoded as the worker's server does it, or the other way round for results.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from splitnn.common import serde
from splitnn.common.operations import OPERATIONS
from splitnn.errors import SpecError, WireError, WorkerError
from splitnn.transport.limits import Limits
from splitnn.wire import OptimizerSpec, module_to_spec
from splitnn.workers.epoch import BatchOrder, EpochPlan, EpochReport, StagePlan
from splitnn.workers.metrics import METRIC_NAMES
from splitnn.workers.refs import BatchRef, DatasetStats, LossStats, TensorRef, ValueShape

MAX = 1 << 20
names = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=64)
keys = st.text(min_size=1, max_size=64)
ids = st.integers(0, 2**63 - 1)
refs = st.builds(TensorRef, names, ids)
tags = st.text("0123456789abcdef", min_size=32, max_size=32)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _wire(args: dict) -> dict:
    """What the other end sees: the arguments (or result) after the JSON of the envelope."""
    return json.loads(json.dumps(args))


LIMITS = Limits(max_tensor_bytes=MAX, max_blob_bytes=MAX)


def _call(op: str, **values) -> dict:
    """What the worker decodes (by field) from a declared operation's call as the client encodes it."""
    args, blobs = OPERATIONS[op].encode_args(**values)
    return OPERATIONS[op].decode_args(_wire(args), blobs, limits=LIMITS)


def _decode(op: str, args: dict, blobs=()) -> dict:
    return OPERATIONS[op].decode_args(args, list(blobs), limits=LIMITS)


def _reply(op: str, value, **call):
    """What the client decodes from a declared operation's result as the worker encodes it."""
    result, blobs = OPERATIONS[op].encode_result(value)
    return OPERATIONS[op].decode_result(_wire(result), blobs, limits=LIMITS, args=call)


def _same_state(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ building blocks
@given(refs)
def test_refs(ref):
    assert serde.ref_from_dict(_wire(serde.ref_to_dict(ref))) == ref


def test_a_fused_gradient_cannot_cross():
    with pytest.raises(WorkerError, match="fused"):
        serde.ref_to_dict(TensorRef("bob", -1, fused=True))


@given(st.lists(st.integers(-(2**40), 2**40), max_size=50))
def test_indices(values):
    idx = torch.tensor(values, dtype=torch.int32 if not values else torch.int64)
    back = serde.indices_from_blob(serde.indices_to_blob(idx), max_bytes=MAX)
    assert back.dtype == torch.int64 and back.tolist() == values


def test_indices_must_be_1d_int64():
    with pytest.raises(WireError):
        serde.indices_from_blob(serde.tensor_to_blob(torch.zeros(2, 2, dtype=torch.int64)), max_bytes=MAX)
    with pytest.raises(WireError):
        serde.indices_from_blob(serde.tensor_to_blob(torch.zeros(3)), max_bytes=MAX)


def test_tensors_states_and_segments():
    t = torch.randn(3, 4)
    assert torch.equal(serde.tensor_from_blob(serde.tensor_to_blob(t), max_bytes=MAX), t)
    layer = nn.Linear(3, 2)
    state = layer.state_dict()
    assert _same_state(serde.state_from_blob(serde.state_to_blob(state), max_bytes=MAX), state)
    spec, back = serde.segment_from_blobs(serde.segment_to_blobs(module_to_spec(layer), state), max_bytes=MAX)
    assert spec == module_to_spec(layer) and _same_state(back, state)
    with pytest.raises(WireError, match="state blob"):
        serde.segment_from_blobs(serde.segment_to_blobs(module_to_spec(layer), state)[:1], max_bytes=MAX)


# ------------------------------------------------------------------------------------ set-up
data_addresses = st.sampled_from([None, ":7101", "10.0.0.5:7101", "[::1]:65535"])


@given(names, st.lists(st.text(max_size=20), max_size=5), st.sampled_from(["cpu", "cuda:0", "mps"]), data_addresses)
def test_hello(name, datasets, device, data):
    hello = serde.hello_from_result(_wire(serde.hello_to_result(name, datasets, device, data=data)))
    assert (hello.name, hello.datasets, hello.device, hello.data) == (name, datasets, device, data)
    assert hello.protocol == serde.PROTOCOL_VERSION
    assert serde.hello_from_result({"name": "bob", "protocol": 1, "device": 7}).device == "?"
    for bad in ("7101", "h:0", "h:70000", "h:x", 7101, "h:" + "9" * 300):
        with pytest.raises(WireError, match="data"):
            serde.hello_from_result({"name": "bob", "protocol": 1, "data": bad})


def test_stats():
    rows = [{"src": "a", "dst": "b", "kind": "activation", "count": 1, "bytes": 4}]
    assert serde.stats_from_result(_wire(serde.stats_to_result(rows, []))) == {"counters": rows, "ledger": []}
    with pytest.raises(WireError):
        serde.stats_from_result({"counters": rows})


@given(
    st.dictionaries(
        names,
        st.builds(serde.PeerAddress, st.just("10.0.0.5:7001"), tags, st.sampled_from([None, "10.0.0.5:7101"])),
        max_size=5,
    ),
    tags,
)
def test_peers(peers, default):
    assert serde.peers_from_args(_wire(serde.peers_to_args(peers)), default_tag=default) == peers


def test_peers_default_to_the_session_tag_and_refuse_junk():
    tag = "0" * 32
    found = serde.peers_from_args({"peers": {"alice": "h:1", "bob": {"address": "h:2"}}}, default_tag=tag)
    assert found == {"alice": serde.PeerAddress("h:1", tag), "bob": serde.PeerAddress("h:2", tag)}
    for bad in (
        {"alice": "no-port"},
        {"a b": "h:1"},
        {"alice": {"address": "h:1", "session": "XYZ"}},
        {"alice": {"address": "h:1", "data": ":7101"}},  # a peer's data plane needs its host
        {"alice": {"address": "h:1", "data": "h:0"}},
        {"alice": {"address": "h:1", "other": "x"}},
    ):
        with pytest.raises(WireError):
            serde.peers_from_args({"peers": bad}, default_tag=tag)


@pytest.mark.parametrize("optimizer", [None, OptimizerSpec("adam", lr=1e-3)])
@pytest.mark.parametrize("replace", [False, True])
def test_add_segment(optimizer, replace):
    layer = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    args, blobs = OPERATIONS["add_segment"].encode_args(
        key="m.s0", optimizer=optimizer, replace=replace, spec=module_to_spec(layer), state=layer.state_dict()
    )
    got = _decode("add_segment", _wire(args), blobs)
    assert (got["key"], got["optimizer"], got["replace"]) == ("m.s0", optimizer, replace)
    spec, state = got["spec"](), got["state"]()
    assert spec == module_to_spec(layer) and _same_state(state, layer.state_dict())
    with pytest.raises(SpecError):
        _decode("add_segment", {"key": "k", "optimizer": {"name": "sgd", "lr": -1}}, blobs)


@given(keys)
def test_segment_keys(key):
    for op in ("remove_segment", "zero_grad", "step", "get_grads", "get_state", "fetch_segment"):
        assert _call(op, key=key)["key"] == key
    assert _call("export_state", key=key, id=5) == {"key": key, "id": 5}


@given(
    st.lists(st.tuples(keys.filter(lambda k: len(k) <= 256), st.floats(1e-30, 1e30)), min_size=1, max_size=20),
    st.lists(keys, min_size=1, max_size=20),
)
def test_average_states(sources, into):
    names, weights = [k for k, _ in sources], [w for _, w in sources]
    got = _call("average_states", keys=names, weights=weights, into=into)
    assert got == {"keys": names, "weights": weights, "into": into}


@pytest.mark.parametrize(
    "change",
    [
        {"weights": [1.0, float("inf")]},
        {"weights": [1.0, float("nan")]},
        {"weights": [1.0, 0.0]},
        {"weights": [1.0, -2.0]},
        {"weights": [1.0, True]},
        {"weights": [1.0, "2"]},
        {"weights": [1.0]},
        {"keys": []},
        {"keys": ["a", 7]},
        {"keys": ["a", ""]},
        {"into": []},
        {"into": ["x" * 257]},
        {"into": ["t"] * (serde.MAX_AVERAGE_SEGMENTS + 1)},
        {"into": "t"},
    ],
)
def test_average_states_refuses_bad_keys_and_weights(change):
    args = {**OPERATIONS["average_states"].encode_args(keys=["a", "b"], weights=[3, 5], into=["t"])[0], **change}
    with pytest.raises(WireError, match="average_states|command argument"):
        _decode("average_states", _wire(args))


@pytest.mark.parametrize("parts", [("features",), ("labels",), ("features", "labels")])
def test_add_dataset(parts):
    tensors = {"features": torch.randn(5, 3), "labels": torch.arange(5)}
    given_parts = {p: tensors[p] for p in parts}
    args, blobs = OPERATIONS["add_dataset"].encode_args(name="d", parts=given_parts, replace=True)
    got = _decode("add_dataset", _wire(args), blobs)
    assert (got["name"], _wire(args)["parts"], got["replace"], got["allow_nonfinite"]) == (
        "d",
        list(parts),
        True,
        False,
    )
    back = got["parts"]()
    assert list(back) == list(parts) and all(torch.equal(back[p], given_parts[p]) for p in parts)
    with pytest.raises(WireError):
        _decode("add_dataset", {"name": "d", "parts": ["features", "features"]}, blobs * 2)


sample_ids = st.lists(st.text(min_size=1, max_size=20), max_size=30, unique=True)


@given(sample_ids)
def test_add_dataset_with_ids(ids_):
    features = torch.randn(len(ids_), 2)
    args, blobs = OPERATIONS["add_dataset"].encode_args(name="d", parts={"features": features, "ids": ids_})
    got = _decode("add_dataset", _wire(args), blobs)
    assert (got["name"], _wire(args)["parts"], got["replace"]) == ("d", ["features", "ids"], False)
    back = got["parts"]()
    assert torch.equal(back["features"], features) and back["ids"] == ids_


def test_ids_alone_are_not_a_dataset_and_must_be_strings():
    with pytest.raises(WireError, match="'features' and/or 'labels'"):
        _decode("add_dataset", {"name": "d", "parts": ["ids"]}, [b"[]"])
    for bad in (b"[1, 2]", b'["a", ""]', b'{"a": 1}', b"\xff", b"[" * 100_000, b'["a", "b"'):
        with pytest.raises(WireError):
            serde.ids_from_blob(bad, max_bytes=MAX)
    with pytest.raises(WireError, match="exceed"):
        serde.ids_from_blob(serde.ids_to_blob(["abc"] * 10), max_bytes=20)
    with pytest.raises(WireError, match="at most 1024 characters"):
        serde.ids_from_blob(serde.ids_to_blob(["x" * 1025]), max_bytes=MAX)


shapes = st.none() | st.lists(st.integers(1, 100), max_size=3).map(tuple)
label_values = st.none() | st.integers(-(2**31), 2**31) | st.floats(allow_nan=False, allow_infinity=False)
stats = st.builds(
    DatasetStats,
    names,
    st.integers(0, 2**40),
    shapes,
    st.none() | st.integers(0, 2**40),
    label_values,
    label_values,
    st.none() | st.sampled_from(["int64", "float32"]),
    shapes,
    st.none() | st.booleans(),
)


@given(stats)
def test_dataset_stats(s):
    assert _call("dataset_stats", name=s.name) == {"name": s.name}
    assert serde.dataset_stats_from_result(_wire(serde.dataset_stats_to_result(s))) == s
    assert _reply("dataset_stats", s) == s


@given(keys, st.lists(st.integers(1, 64), min_size=1, max_size=4).map(tuple))
def test_probe(key, shape):
    assert _call("probe", key=key, input_shape=shape) == {"key": key, "input_shape": shape}
    assert _reply("probe", shape) == shape


def test_probe_shapes_must_be_small_and_positive():
    for bad in ([], [0], [1] * 9, [1 << 21], [1 << 14, 1 << 14], [True]):
        with pytest.raises(WireError):
            _decode("probe", {"key": "k", "input_shape": {"shape": bad}})


value_shapes = st.lists(
    st.builds(
        ValueShape,
        st.lists(st.integers(1, 16), min_size=0, max_size=4).map(tuple),
        st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool, torch.uint8]),
    ),
    min_size=1,
    max_size=6,
).map(tuple)


@given(keys, value_shapes)
def test_probe_of_several_values(key, shape):
    """A cut that several values cross is probed with a shape and a dtype per value, both ways."""
    assert _call("probe", key=key, input_shape=shape) == {"key": key, "input_shape": shape}
    assert _reply("probe", shape) == shape


def test_probes_of_several_values_refuse_junk():
    ok = {"shape": [2, 3], "dtype": "float32"}
    for bad in (
        [],
        [ok] * 65,
        [{"shape": [2, 3]}],
        [{**ok, "dtype": "complex64"}],
        [{**ok, "dtype": 5}],
        [{**ok, "shape": [0]}],
        [{**ok, "shape": [1] * 9}],
        [{**ok, "shape": [1 << 14, 1 << 13]}],
        [ok, {"shape": [1 << 13, 1 << 13], "dtype": "int64"}],
        "values",
    ):
        with pytest.raises(WireError):
            _decode("probe", {"key": "k", "input_shape": {"values": bad}})
    with pytest.raises(WireError):
        OPERATIONS["probe"].decode_result(
            {"shape": {"values": [{"shape": [-1], "dtype": "float32"}]}}, [], limits=LIMITS
        )


@pytest.mark.parametrize("output,input_grad", [("none", "int8"), ("fp16", "bf16"), ("topk:0.05", "none")])
def test_set_codecs(output, input_grad):
    got = _call("set_codecs", key="m.s1", output=output, input_grad=input_grad)
    assert got == {"key": "m.s1", "output": output, "input_grad": input_grad}
    for bad in ({"output": "zip", "input_grad": "none"}, {"output": "topk:2", "input_grad": "none"}, {"output": 3}):
        with pytest.raises(WireError):
            _decode("set_codecs", {"key": "k", "input_grad": "none", **bad})


# ----------------------------------------------------------------------------- the training step
def test_put():
    t = torch.randn(2, 3)
    args, blobs = OPERATIONS["put"].encode_args(id=9, kind="features", values=t)
    got = _decode("put", _wire(args), blobs)
    assert (got["id"], got["kind"], "values" in args) == (9, "features", False) and torch.equal(got["values"], t)
    assert torch.equal(serde.tensor_from_blob(blobs[0], max_bytes=MAX), t)


def test_put_and_fetch_of_several_values():
    """A model that takes a tuple: the researcher's input crosses as one values blob; a fetched tuple the same."""
    x, mask = torch.randn(4, 20, requires_grad=True), torch.ones(4, 16)
    args, blobs = OPERATIONS["put"].encode_args(id=3, kind="features", values=(x, mask))
    decoded = _decode("put", _wire(args), blobs)
    assert (decoded["id"], decoded["kind"], _wire(args)["values"]) == (3, "features", 2)
    got = decoded["values"]
    assert torch.equal(got[0], x.detach()) and torch.equal(got[1], mask)
    assert not any(t.requires_grad for t in got)  # data: nothing goes back to the researcher
    back = _reply("fetch", (mask, torch.arange(3)))
    assert torch.equal(back[0], mask) and torch.equal(back[1], torch.arange(3))
    assert torch.equal(_reply("fetch", mask), mask)
    with pytest.raises(WireError):  # says one tensor, carries several
        serde.value_from_blob(serde.value_to_blob((mask,)), several=False, max_bytes=MAX)
    with pytest.raises(WireError):
        serde.value_from_blob(serde.value_to_blob(mask), several=True, max_bytes=MAX)
    for bad in (0, 65, -1, True, "2"):
        with pytest.raises(WireError):
            _decode("put", {"id": 1, "kind": "features", "values": bad}, blobs)


@given(keys, st.booleans(), ids, refs | st.builds(BatchRef, names, st.just(torch.tensor([3, 1, 2]))))
@settings(max_examples=30)
def test_forward(key, train, tid, source):
    args, blobs = OPERATIONS["forward"].encode_args(key=key, src=source, train=train, id=tid)
    args = _wire(args)
    got = _decode("forward", args, blobs)
    got_key, got_source, got_train = got["key"], got["src"], got["train"]
    assert OPERATIONS["forward"].output_ids(args, limits=LIMITS) == [tid] and (got_key, got_train) == (key, train)
    if isinstance(source, BatchRef):
        assert got_source.dataset == source.dataset and torch.equal(got_source.indices, source.indices)
    else:
        assert got_source == source


@pytest.mark.parametrize("keep", [None, "eval-1"])
@pytest.mark.parametrize("train", [False, True])
def test_loss(keep, train):
    target = BatchRef("d", torch.tensor([4, 0]))
    args, blobs = OPERATIONS["loss"].encode_args(
        output=TensorRef("bob", 3), target=target, loss="nll", train=train, keep=keep
    )
    m = _decode("loss", _wire(args), blobs)
    assert (m["output"], m["loss"], m["train"], m["keep"]) == (TensorRef("bob", 3), "nll", train, keep)
    assert m["target"].dataset == "d" and torch.equal(m["target"].indices, target.indices)


@given(st.floats(allow_nan=False), st.integers(-1, 2**31), st.integers(0, 2**31))
def test_loss_stats(loss, correct, count):
    s = LossStats(loss, correct, count)
    assert serde.loss_stats_from_result(_wire(serde.loss_stats_to_result(s))) == s
    assert _reply("loss", s) == s


@given(st.text(min_size=1, max_size=256), st.lists(st.sampled_from(METRIC_NAMES), min_size=1, max_size=4))
def test_metrics(keep, names_):
    assert _call("metrics", keep=keep, names=names_) == {"keep": keep, "names": tuple(names_)}
    values = {n: 0.25 * i for i, n in enumerate(names_)}
    assert _reply("metrics", values, names=list(values)) == values


def test_metrics_nan_travels():
    back = _reply("metrics", {"auc": math.nan}, names=["auc"])
    assert math.isnan(back["auc"])


@given(keys, st.none() | refs, st.none() | ids)
def test_backward(key, grad, tid):
    args, _ = OPERATIONS["backward"].encode_args(key=key, grad=grad, id=tid)
    args = _wire(args)
    assert _decode("backward", args) == {"key": key, "grad": grad, "id": tid}
    assert OPERATIONS["backward"].output_ids(args, limits=LIMITS) == [tid]
    assert serde.output_id_from_args(args, optional=True) == tid


@given(keys, st.lists(refs, min_size=1, max_size=5), st.sampled_from(["concat", "sum", "mean"]), ids, st.booleans())
def test_forward_merged(key, sources, merge, tid, train):
    got = _call("forward_merged", key=key, srcs=sources, merge=merge, train=train, id=tid)
    assert got == {"key": key, "srcs": sources, "merge": merge, "train": train, "id": tid}
    args = _wire(OPERATIONS["forward_merged"].encode_args(key=key, srcs=sources, merge=merge, train=train, id=tid)[0])
    assert serde.output_id_from_args(args) == tid


@given(keys, st.none() | refs, st.lists(ids, min_size=1, max_size=5))
def test_backward_merged(key, grad, tids):
    args = _wire(OPERATIONS["backward_merged"].encode_args(key=key, grad=grad, ids=tids)[0])
    assert _decode("backward_merged", args) == {"key": key, "grad": grad, "ids": tids}
    assert OPERATIONS["backward_merged"].output_ids(args, limits=LIMITS) == tids


def test_merge_sizes_are_bounded():
    too_many = [{"owner": "a", "id": i} for i in range(serde.MAX_MERGE_SOURCES + 1)]
    with pytest.raises(WireError):
        _decode("forward_merged", {"key": "k", "train": True, "merge": "sum", "srcs": too_many, "id": 1})
    for bad in ([], [-1], [True], list(range(serde.MAX_MERGE_SOURCES + 1))):
        with pytest.raises(WireError):
            OPERATIONS["backward_merged"].output_ids({"ids": bad}, limits=LIMITS)


# -------------------------------------------------------------------------- weights and outputs
@given(keys, refs)
def test_load_state(key, src):
    assert _call("load_state", key=key, src=src) == {"key": key, "src": src}


def test_set_state():
    state = nn.Linear(2, 2).state_dict()
    got = _call("set_state", key="k", state=state)
    assert got["key"] == "k" and _same_state(got["state"], state)
    assert _same_state(_reply("get_state", state), state) and _same_state(_reply("get_grads", state), state)


@given(refs, st.sampled_from(["output", "activation"]))
def test_fetch(ref, kind):
    assert _call("fetch", ref=ref, kind=kind) == {"ref": ref, "kind": kind}


# --------------------------------------------------------------------- private set intersection
@given(keys, keys, ids)
def test_psi_request(session, dataset, tid):
    assert _call("psi_request", session=session, dataset=dataset, id=tid) == {
        "session": session,
        "dataset": dataset,
        "id": tid,
    }


@given(keys, refs, ids)
def test_psi_reply(dataset, request, tid):
    assert _call("psi_reply", dataset=dataset, src=request, id=tid) == {"dataset": dataset, "src": request, "id": tid}


@given(keys, refs)
def test_psi_finish(session, reply):
    assert _call("psi_finish", session=session, src=reply) == {"session": session, "src": reply}


@given(st.integers(0, 2**63 - 1))
def test_psi_size(size):
    assert _reply("psi_size", size) == size
    for bad in ({}, {"size": -1}, {"size": True}, {"size": 1.5}, {"size": "3"}):
        with pytest.raises(WireError):
            OPERATIONS["psi_size"].decode_result(bad, [], limits=LIMITS)


@given(keys, st.dictionaries(keys, st.lists(st.integers(0, 2**40), min_size=1, max_size=20), max_size=4))
def test_psi_apply(dataset, parts):
    given_parts = {name: torch.tensor(idx) for name, idx in parts.items()}
    got = _call("psi_apply", dataset=dataset, parts=given_parts)
    name, back = got["dataset"], got["parts"]
    assert name == dataset and list(back) == list(parts)
    assert all(back[k].tolist() == parts[k] for k in parts)


def test_psi_apply_refuses_mismatched_parts():
    args, blobs = OPERATIONS["psi_apply"].encode_args(
        dataset="d", parts={"d:train": torch.arange(3), "d:test": torch.arange(2)}
    )
    for bad_args, bad_blobs in (
        (args, blobs[:1]),  # a part without its indices
        ({**args, "parts": ["d:train", "d:train"]}, blobs),  # a name twice
        ({**args, "parts": ["x"] * (serde.MAX_PSI_PARTS + 1)}, blobs),
        ({**args, "parts": ["", "y"]}, blobs),
        (args, [blobs[0], serde.tensor_to_blob(torch.zeros(2))]),  # float positions
    ):
        with pytest.raises(WireError):
            _decode("psi_apply", bad_args, bad_blobs)


# ------------------------------------------------------------------------------- shipped epochs
PLAN_STAGES = (StagePlan(1, "s1", "alice", "bob"), StagePlan(2, "s2", "bob", None))


@pytest.mark.parametrize("explicit", [False, True])
def test_epoch_plan(explicit):
    if explicit:
        batches = (torch.tensor([5, 1, 0]), torch.tensor([2]), torch.tensor([4, 3]))
        plan = EpochPlan(7, "d", "nll", PLAN_STAGES, indices=batches, progress_interval=0.5)
    else:
        plan = EpochPlan(7, "d", "nll", PLAN_STAGES, order=BatchOrder(10, 4, seed=3, epoch=2))
    args, blobs = serde.epoch_plan_to_command(plan)
    back = serde.epoch_plan_from_command(_wire(args), blobs, worker="bob", max_bytes=MAX)
    assert (back.run_id, back.dataset, back.loss, back.stages, back.order, back.progress_interval) == (
        plan.run_id,
        plan.dataset,
        plan.loss,
        plan.stages,
        plan.order,
        plan.progress_interval,
    )
    assert [b.tolist() for b in back.batches()] == [b.tolist() for b in plan.batches()]


def test_epoch_plans_are_consistent_for_their_worker():
    args, blobs = serde.epoch_plan_to_command(EpochPlan(7, "d", "nll", PLAN_STAGES, order=BatchOrder(10, 4)))
    with pytest.raises(WireError, match="fed by this worker"):  # stage 2 is fed by alice, not here
        serde.epoch_plan_from_command(args, blobs, worker="alice", max_bytes=MAX)
    with pytest.raises(WireError, match="first stage"):
        serde.epoch_plan_from_command(
            {**args, "stages": [{"index": 1, "key": "s", "prev": None, "next": None}]}, [], worker="x", max_bytes=MAX
        )


@given(st.lists(st.builds(LossStats, st.floats(allow_nan=False), st.just(-1), st.integers(1, 2**31)), max_size=20))
def test_progress_losses(losses):
    assert serde.losses_from_result(_wire(serde.losses_to_result(losses))) == losses


@given(st.integers(0, 2**40))
def test_epoch_report(batches):
    assert serde.epoch_report_from_result(_wire(serde.epoch_report_to_result(batches)), "bob") == EpochReport(
        "bob", batches
    )


# ---------------------------------------------------------------------------------------- junk
DECODERS = [
    serde.ref_from_dict,
    serde.hello_from_result,
    serde.stats_from_result,
    lambda a: serde.peers_from_args(a, default_tag="0" * 32),
    serde.dataset_stats_from_result,
    serde.loss_stats_from_result,
    lambda a: serde.epoch_plan_from_command(a, [], worker="bob", max_bytes=MAX),
    serde.losses_from_result,
    lambda a: serde.epoch_report_from_result(a, "bob"),
    lambda a: serde.ids_from_blob(json.dumps(a).encode(), max_bytes=MAX),
    *(lambda a, op=op: op.decode_args(a, [], limits=LIMITS) for op in OPERATIONS.values()),
    *(lambda a, op=op: op.decode_result(a, [], limits=LIMITS, args={"names": ["auc"]}) for op in OPERATIONS.values()),
]


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "key",
                "id",
                "ids",
                "src",
                "srcs",
                "grad",
                "name",
                "parts",
                "shape",
                "peers",
                "loss",
                "train",
                "keep",
                "names",
                "values",
                "output",
                "input_grad",
                "ref",
                "kind",
                "dataset",
                "optimizer",
                "run",
                "stages",
                "order",
                "batches",
                "counters",
                "ledger",
                "protocol",
                "datasets",
                "correct",
                "count",
                "session",
                "size",
                "keys",
                "weights",
                "into",
                "input_shape",
                "target",
                "values",
                "stats",
                "state",
                "steps",
                "job",
            ]
        ),
        json_values,
        max_size=8,
    )
)
@settings(max_examples=200)
def test_decoders_refuse_junk_with_a_wire_error(args):
    for decode in DECODERS:
        try:
            decode(args)
        except (WireError, SpecError):
            pass


def test_epoch_plans_carry_their_chain_and_depth():
    chain = ("alice", "bob", "bob")  # bob runs stages 1 and 2 (PLAN_STAGES)
    plan = EpochPlan(7, "d", "nll", PLAN_STAGES, order=BatchOrder(10, 4), chain=chain, pipeline=4, prediction=0.25)
    args, blobs = serde.epoch_plan_to_command(plan)
    back = serde.epoch_plan_from_command(_wire(args), blobs, worker="bob", max_bytes=MAX)
    assert (back.chain, back.pipeline, back.prediction) == (chain, 4, 0.25)
    no_prediction = {k: v for k, v in _wire(args).items() if k != "prediction"}  # an older researcher's plan
    assert serde.epoch_plan_from_command(no_prediction, blobs, worker="bob", max_bytes=MAX).prediction is None
    for bad, match in (
        ({"prediction": "0.5"}, "prediction"),
        ({"prediction": True}, "prediction"),
        ({"prediction": 1.0}, "prediction"),
        ({"prediction": -0.1}, "prediction"),
        ({"pipeline": 0}, "pipeline"),
        ({"pipeline": 65}, "pipeline"),
        ({"pipeline": True}, "pipeline"),
        ({"chain": "alice,bob"}, "chain"),
        ({"chain": ["carol", "bob", "bob"]}, "does not fit its chain"),  # stage 1's previous party is alice
        ({"chain": ["alice", "bob", "bob", "bob"]}, "does not fit its chain"),  # stage 2 is not the last
        ({"chain": ["bob", "bob", "bob"]}, "does not fit its chain|other stages"),
        ({"chain": None, "pipeline": 2}, "needs the chain"),
    ):
        with pytest.raises(WireError, match=match):
            serde.epoch_plan_from_command({**_wire(args), **bad}, blobs, worker="bob", max_bytes=MAX)


def test_dataset_stats_carry_the_feature_dtype_and_refuse_an_unknown_one():
    stats = DatasetStats("d", 4, (16,), None, None, feature_dtype="int64")
    assert serde.dataset_stats_from_result(serde.dataset_stats_to_result(stats)) == stats
    bad = {**serde.dataset_stats_to_result(stats), "feature_dtype": "object"}
    with pytest.raises(WireError, match="unknown feature dtype 'object'"):
        serde.dataset_stats_from_result(bad)


def test_a_batchs_draw_crosses_with_it_and_a_bad_draw_is_refused():
    from splitnn.data.batching import BatchDraw, epoch_batches

    idx = epoch_batches(40, 8, seed=3, epoch=2)[4]
    args, blobs = OPERATIONS["forward"].encode_args(key="k", src=BatchRef("d", idx), train=True, id=1)
    batch = _decode("forward", args, blobs)["src"]
    assert batch.draw == BatchDraw(seed=3, epoch=2, position=4, batch_size=8, shuffle=True)
    args, blobs = OPERATIONS["loss"].encode_args(
        output=TensorRef("a", 1), target=BatchRef("d", idx), loss="nll", train=False
    )
    assert _decode("loss", args, blobs)["target"].draw == batch.draw
    for bad in ({"seed": -1, "epoch": 0, "position": 0, "batch_size": 8, "shuffle": True}, {"seed": 0}, [1]):
        args["target"]["draw"] = bad
        with pytest.raises(WireError, match="(?i)draw"):
            _decode("loss", args, blobs)
