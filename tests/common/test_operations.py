"""The table of remote operations: each declaration fits what serves it, and hostile fields are refused by name."""

from __future__ import annotations

import inspect
import json
import math

import grpc
import pytest
import torch

import splitnn
from splitnn.client import RemoteWorker
from splitnn.common.operations import OPERATIONS
from splitnn.common.schema import Float, Int, Key, ListOf, Party, Ref, StateBlob, Str
from splitnn.errors import WireError
from splitnn.server.commands import Commands
from splitnn.transport.limits import Limits
from splitnn.wire.proto import CALL, Command, Reply
from splitnn.wire.spec import module_to_spec
from splitnn.workers import VirtualWorker
from tests.transport.cluster import Cluster

LIMITS = Limits(max_tensor_bytes=1 << 20, max_blob_bytes=1 << 20)


# --------------------------------------------------------------------------- declarations
@pytest.mark.parametrize("op", list(OPERATIONS.values()), ids=list(OPERATIONS))
def test_each_operation_is_served_by_the_engine_method_it_names_or_a_handler(op):
    if op.serve is None:
        assert inspect.iscoroutinefunction(getattr(Commands, f"_serve_{op.name}"))
        return
    params = inspect.signature(getattr(VirtualWorker, op.serve)).parameters
    names = [f.name for f in op.args] + ([op.caller] if op.caller else [])
    assert set(names) <= set(params), f"{op.name}: {names} do not fit VirtualWorker.{op.serve}{list(params)}"
    required = {n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty}
    assert required <= set(names), f"{op.name}: VirtualWorker.{op.serve} also needs {required - set(names)}"


@pytest.mark.parametrize("op", [op for op in OPERATIONS.values() if op.method], ids=lambda op: op.name)
def test_the_client_method_of_an_operation_takes_its_fields_like_the_engine(op):
    remote = inspect.signature(getattr(RemoteWorker, op.method))
    engine = inspect.signature(getattr(VirtualWorker, op.method))
    assert list(remote.parameters) == [p for p in engine.parameters if p != (op.caller or "")]
    for name, p in remote.parameters.items():
        assert p.kind == engine.parameters[name].kind, name
        assert p.default == engine.parameters[name].default, name
    assert getattr(RemoteWorker, op.method).__doc__


def test_the_pipelined_operations_are_those_whose_failures_surface_at_the_next_call():
    from splitnn.client.command_stream import ASYNC_OPS

    assert {name for name, op in OPERATIONS.items() if not op.wait} == ASYNC_OPS
    sent_without_waiting = {"zero_grad", "forward", "backward", "step", "put", "release", "remove_segment", "stage"}
    assert sent_without_waiting | {"forward_merged", "backward_merged", "export_state", "load_state"} <= ASYNC_OPS
    assert {"psi_request", "psi_reply", "psi_finish"} <= ASYNC_OPS and not {"loss", "fetch", "get_state"} & ASYNC_OPS


# ------------------------------------------------------------------------------- fields
@pytest.mark.parametrize(
    "field,raw,says",
    [
        (Key(), 5, "'key' has the wrong type int"),
        (Key(), "k" * 257, "'key' is too long"),
        (Str("job", min_len=16), "short", "'job' is too short"),
        (Str("name", choices=("a", "b")), "c", "'name' must be one of"),
        (Int("n", lo=1, hi=3), 4, "'n' is out of range 1..3"),
        (Int("n"), True, "'n' has the wrong type bool"),
        (Float("w", positive=True), 0.0, "'w' must be a finite number > 0"),
        (Float("w"), math.inf, "'w' must be a finite number"),
        (ListOf("keys", Key(""), min_len=1, max_len=2), [], "'keys' must list 1..2 items, got 0"),
        (ListOf("keys", Key(""), max_len=2), ["a", "b", "c"], "'keys' must list 0..2 items, got 3"),
        (ListOf("keys", Key(""), max_len=4, unique=True), ["a", "a"], "'keys' lists an item twice"),
        (ListOf("keys", Key(""), max_len=4), ["a", 7], "'keys' item 1 has the wrong type int"),
        (ListOf("names", Party(""), max_len=4), ["a b"], "'names' item 0 party name must be"),
        (Ref("src"), {"owner": "a"}, "'src' must be a tensor ref"),
        (Ref("src"), {"owner": "a", "id": -1}, "'src' must hold a tensor id"),
    ],
)
def test_a_field_refuses_what_breaks_its_rule_naming_the_operation_and_the_field(field, raw, says):
    from splitnn.common.schema import Blobs

    with pytest.raises(WireError, match=f"^op: command argument {says}"):
        field.decode("op", {field.name: raw}, Blobs([], LIMITS))


def test_a_missing_field_or_blob_is_named():
    with pytest.raises(WireError, match="zero_grad: command argument 'key' is missing"):
        OPERATIONS["zero_grad"].decode_args({}, [], limits=LIMITS)
    with pytest.raises(WireError, match="missing its state blob"):
        OPERATIONS["set_state"].decode_args({"key": "k"}, [], limits=LIMITS)
    with pytest.raises(WireError, match="exceed|bytes"):  # a state blob over the limit
        big = StateBlob("state")
        blobs: list[bytes] = []
        big.encode({"w": torch.zeros(1 << 19)}, {}, blobs)
        OPERATIONS["set_state"].decode_args({"key": "k"}, blobs, limits=LIMITS)


def test_an_autocast_mode_that_is_not_one_of_the_precision_modes_is_refused_naming_the_field():
    """``add_segment``'s ``autocast``: the names of :data:`~splitnn.workers.precision.AUTOCAST_DTYPES` only, checked
    before the segment's blobs are taken; absent or null: the party's own (full precision)."""
    for bad in ("fp8", "bfloat16", 16, ["bf16"]):
        with pytest.raises(WireError, match="^add_segment: command argument 'autocast' (must be one of|has the wrong)"):
            OPERATIONS["add_segment"].decode_args({"key": "k", "autocast": bad}, [], limits=LIMITS)
    args, blobs = OPERATIONS["add_segment"].encode_args(
        key="k", optimizer=None, autocast="bf16", spec=module_to_spec(torch.nn.Linear(2, 2)), state={}
    )
    assert args["autocast"] == "bf16"
    assert OPERATIONS["add_segment"].decode_args(args, blobs, limits=LIMITS)["autocast"] == "bf16"
    del args["autocast"]
    assert OPERATIONS["add_segment"].decode_args(args, blobs, limits=LIMITS)["autocast"] is None


def test_a_remote_worker_with_an_autocast_mode_it_does_not_know_is_refused_before_connecting():
    # nothing listens at port 1: the ConfigurationError (not a WorkerError) shows the check came first
    with pytest.raises(
        splitnn.ConfigurationError, match=r"autocast must be one of \['bf16', 'fp16'\] or None, got 'fp8'"
    ):
        splitnn.connect("grpc://127.0.0.1:1", token="t" * 32, autocast="fp8")


def test_the_cross_field_check_of_average_states():
    with pytest.raises(WireError, match="one finite number > 0 per source segment"):
        args = {"keys": ["a", "b"], "weights": [1.0], "into": ["t"]}
        OPERATIONS["average_states"].decode_args(args, [], limits=LIMITS)


# ------------------------------------------------------------------------- a live worker
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("operations")) as cl:
        cl.start("bob")
        yield cl


def _raw_call(cl: Cluster, op: str, args: dict, blobs=()) -> Reply:
    md = [("x-splitnn-token", cl.token), ("x-splitnn-party", "researcher")]
    with grpc.insecure_channel(cl.workers["bob"].address) as ch:
        raw = ch.unary_unary(CALL, request_serializer=None, response_deserializer=None)(
            Command(op=op, args_json=json.dumps(args), blobs=list(blobs)).SerializeToString(), metadata=md, timeout=60
        )
    return Reply.FromString(raw)


@pytest.mark.network
@pytest.mark.parametrize(
    "op,args,says",
    [
        ("zero_grad", {"key": 5}, "zero_grad: command argument 'key' has the wrong type int"),
        ("average_states", {"keys": ["a"], "weights": [-1], "into": ["b"]}, "'weights' item 0 must be a finite"),
        ("average_states", {"keys": ["a"] * 1025, "weights": [1] * 1025, "into": ["b"]}, "'keys' must list 1..1024"),
        ("metrics", {"keep": "e", "names": ["accuracy", "loss"]}, "'names' item 1 must be one of"),
        ("checkpoint_steps", {"job": "../../etc"}, "'job' is too short"),
        ("checkpoint_steps", {"job": "a" * 15 + "/"}, "'job' holds characters outside"),
        ("set_codecs", {"key": "k", "output": "zip", "input_grad": "none"}, "'output'"),
        ("neighbours", {"names": ["a b"]}, "'names' item 0 party name"),
        ("put", {"id": 1, "kind": "activation"}, "'kind' must be one of ['features']"),
        ("forward", {"key": "k", "src": {"dataset": "d"}, "train": True, "id": 2}, "missing its indices blob"),
        ("loss", {"output": {"owner": "bob", "id": 1}, "target": 5, "loss": "nll", "train": True}, "'target' must"),
        ("backward_merged", {"key": "k", "ids": []}, "'ids' must list 1..256 items, got 0"),
        ("add_segment", {"key": "k", "autocast": "fp8"}, "add_segment: command argument 'autocast' must be one of"),
    ],
)
def test_a_worker_refuses_hostile_fields_of_table_operations_naming_the_field(cluster, op, args, says):
    reply = _raw_call(cluster, op, args)
    assert not reply.ok and reply.error_type == "WireError" and says in reply.error, reply.error
    assert cluster.workers["bob"].alive()


@pytest.mark.network
def test_table_operations_run_at_a_worker_as_in_process(cluster):
    (bob,) = cluster.connect("bob")
    twin = VirtualWorker("bob")
    try:
        for w in (bob, twin):
            torch.manual_seed(0)
            w.add_segment("k", torch.nn.Linear(3, 2), "sgd:lr=0.1")
            w.add_segment("t", torch.nn.Linear(3, 2), "sgd:lr=0.1")
            w.add_dataset("d", features=torch.arange(12.0).reshape(4, 3), labels=torch.tensor([0, 1, 1, 0]))
            w.average_states(["k", "t"], [1.0, 3.0], into=["t"])
        assert bob.probe("k", (5, 3)) == twin.probe("k", (5, 3)) == (5, 2)
        assert bob.dataset_stats("d") == twin.dataset_stats("d")
        for key in ("k", "t"):
            got, want = bob.get_state(key), twin.get_state(key)
            assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)
        bob.remove_segment("t")
        with pytest.raises(splitnn.SplitNNError, match="'t'"):
            bob.get_state("t")
    finally:
        bob.close()


@pytest.mark.network
def test_trainable_only_state_crosses_the_wire_as_in_process(cluster):
    """``get_state(trainable_only=True)`` over the wire (issue 27's collect_state across worker processes): the
    buffers stay at the party, the trainable parameters equal the in-process engine's."""
    (bob,) = cluster.connect("bob")
    twin = VirtualWorker("bob")
    try:
        for w in (bob, twin):
            torch.manual_seed(0)
            w.add_segment("k", torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)), "sgd:lr=0.1")
        got, want = bob.get_state("k", trainable_only=True), twin.get_state("k", trainable_only=True)
        assert list(got) == list(want) == ["0.weight", "0.bias", "1.weight", "1.bias"]
        assert all(torch.equal(got[n], want[n]) for n in want)
        assert "1.running_mean" in bob.get_state("k")  # all of it without trainable_only
        reply = _raw_call(cluster, "get_state", {"key": "k", "trainable_only": "yes"})
        assert not reply.ok and "'trainable_only' has the wrong type str" in reply.error
    finally:
        bob.close()


@pytest.mark.network
def test_gradient_norms_and_clipping_cross_the_wire_as_in_process(cluster):
    """``grad_norms`` and ``clip_grads`` over the wire (clipping by the global norm across worker processes): the
    norms and the clipped gradients equal the in-process engine's; a total norm that is not a scalar is refused."""
    from splitnn.workers.refs import BatchRef

    (bob,) = cluster.connect("bob")
    twin = VirtualWorker("bob")
    try:
        x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1] * 4)
        for w in (bob, twin):
            torch.manual_seed(0)
            w.add_segment("k", torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LogSoftmax(dim=1)), "sgd:lr=0.1")
            w.add_dataset("d", features=x, labels=y)
            batch = BatchRef("d", torch.arange(8))
            w.loss(w.forward("k", batch), batch, "nll")
            w.backward("k", None)
        norms = bob.grad_norms("k")
        assert torch.equal(norms, twin.grad_norms("k")) and norms.shape == (2,)
        total = torch.linalg.vector_norm(norms)
        for w in (bob, twin):
            w.clip_grads("k", 0.1, total)
        got, want = bob.get_grads("k"), twin.get_grads("k")
        assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)
        assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in got.values()])) <= 0.1 + 1e-6
        bob.clip_grads("k", 0.1, torch.ones(2))
        with pytest.raises(splitnn.SplitNNError, match="'total_norm' tensor frame has 1 dimensions"):
            bob.drain()
    finally:
        bob.close()


@pytest.mark.network
def test_frozen_parameters_stay_frozen_at_a_worker_as_in_process(cluster):
    """A layer the researcher froze (requires_grad False) trains at no party: ``add_segment`` names the frozen
    parameters, since a layer spec says nothing of them. Two SGD steps; the frozen layer ends as it began and
    every weight equals the in-process engine's; a name that is not a parameter is refused."""
    from splitnn.workers.refs import BatchRef

    (bob,) = cluster.connect("bob")
    twin = VirtualWorker("bob")
    try:
        x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1] * 4)
        for w in (bob, twin):
            torch.manual_seed(0)
            seg = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.LogSoftmax(dim=1))
            seg[0].requires_grad_(False)
            start = {k: v.clone() for k, v in seg.state_dict().items()}
            w.add_segment("f", seg, "sgd:lr=0.5")
            w.add_dataset("fd", features=x, labels=y)
            batch = BatchRef("fd", torch.arange(8))
            for _ in range(2):
                w.zero_grad("f")
                w.loss(w.forward("f", batch), batch, "nll")
                w.backward("f", None)
                w.step("f")
        got, want = bob.get_state("f"), twin.get_state("f")
        assert all(torch.equal(got[n], want[n]) for n in want)
        assert torch.equal(got["0.weight"], start["0.weight"]) and not torch.equal(got["1.weight"], start["1.weight"])
        assert list(bob.get_state("f", trainable_only=True)) == ["1.weight", "1.bias"]
        args, blobs = OPERATIONS["add_segment"].encode_args(
            key="g", optimizer=None, replace=False, frozen=["nope"], spec=module_to_spec(seg), state=seg.state_dict()
        )
        reply = _raw_call(cluster, "add_segment", args, blobs)
        assert not reply.ok and "'frozen' names 'nope'" in reply.error, reply.error
    finally:
        bob.close()
