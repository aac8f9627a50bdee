"""Issue 24, items 1 and 4, against real `splitnn worker` processes: the graphs that crashed a worker, read its
heap or made it allocate gigabytes are refused, each by its own rule (an op outside the vocabulary, ``out=``,
the memory budget), and imports are built only from a class's own trusted module. After each attack the
worker is alive, serves a benign segment, and its peak memory stayed bounded."""

from __future__ import annotations

import json
import os

import grpc
import pytest
import torch
from torch import fx, nn

import splitnn
from splitnn.errors import MemoryBudgetError
from splitnn.wire.proto import CALL, Command, Reply
from splitnn.wire.state_codec import encode_state
from tests.cut_models import SmallResNet
from tests.helpers import write_trust_packages
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

PEAK_LIMIT = 900 * 2**20  # a worker's peak resident memory (VmHWM) after every attack here


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pkgs = tmp_path_factory.mktemp("pkgs")
    write_trust_packages(pkgs)
    with Cluster(tmp_path_factory.mktemp("vocab")) as cl:
        cl.env["PYTHONPATH"] = os.pathsep.join([str(pkgs), os.environ.get("PYTHONPATH", "")])
        cl.start("eve", "--trust", "mypkg.models")  # the default budget (1 GiB)
        cl.start("tight", "--max-session-memory", "256MiB")
        cl.pkgs = pkgs
        yield cl
        assert all(w.alive() for w in cl.workers.values()), "a worker died during the tests"


def _raw_add_segment(cluster, name: str, spec: dict, state: dict | None = None) -> Reply:
    """What a hostile researcher sends: any JSON spec, past the client's own checks."""
    with grpc.insecure_channel(cluster.workers[name].address) as ch:
        cmd = Command(seq=1, op="add_segment", args_json=json.dumps({"key": "attack", "optimizer": None}))
        cmd.blobs.extend([json.dumps(spec).encode(), encode_state(state or {})])
        md = (("x-splitnn-token", cluster.token), ("x-splitnn-party", "researcher"))
        raw = ch.unary_unary(CALL, request_serializer=None, response_deserializer=None)(
            cmd.SerializeToString(), metadata=md, timeout=30
        )
    return Reply.FromString(raw)


def _serves_on(cluster, name: str) -> None:
    worker = cluster.workers[name]
    assert worker.alive()
    (w,) = cluster.connect(name)
    try:
        w.add_segment("benign", splitnn.cut(SmallResNet(width=2), at=["layer2"])[0], None)
        assert w.probe("benign", (1, 1, 12, 12)) == (1, 2, 12, 12)
    finally:
        w.close()
    assert worker.rss_bytes("VmHWM") < PEAK_LIMIT


def _fn(target, *args, **kwargs):
    return {"op": "call_function", "target": target, "args": list(args), "kwargs": kwargs}


def _method(target, *args, **kwargs):
    return {"op": "call_method", "target": target, "args": list(args), "kwargs": kwargs}


def _graph(*nodes, attrs=None):
    nodes = [{"op": "placeholder"}, *nodes]
    return {
        "type": "Graph",
        "modules": {},
        "attrs": attrs or {},
        "nodes": [*nodes, {"op": "output", "args": [{"node": len(nodes) - 1}]}],
    }


_BUF = {"buf": {"kind": "buffer", "shape": [64], "dtype": "float32", "requires_grad": False}}
_BN = {n: {"kind": "buffer", "shape": [1], "dtype": "float32", "requires_grad": False} for n in ("w", "b", "rm", "rv")}
X = {"node": 0}

ATTACKS = {
    # index -1e8 without invariant checks, densified: SIGSEGV before
    "sparse-coo-to-dense": (
        _graph(
            _fn("torch.sparse_coo_tensor", [[-100_000_000]], [1.0], [4], check_invariants=False),
            _method("to_dense", {"node": 1}),
        ),
        None,
        "'torch.sparse_coo_tensor' is not on the allow-list",
    ),
    "segment-reduce": (
        _graph(_fn("torch.segment_reduce", X, "sum", offsets={"node": 0}, unsafe=True)),
        None,
        "'torch.segment_reduce' is not on the allow-list",
    ),
    "sparse-csr-mm": (
        _graph(
            _fn("torch.sparse_csr_tensor", [0, 1], [100_000_000], [1.0], [1, 4]),
            _fn("torch.mm", {"node": 1}, X),
        ),
        None,
        "'torch.sparse_csr_tensor' is not on the allow-list",
    ),
    "empty-into-buffer": (
        _graph(
            {"op": "get_attr", "target": "buf"},
            _fn("torch.empty", 64),
            _fn("torch.add", {"node": 2}, 0, out={"node": 1}),
        ),
        {"buf": torch.zeros(64)},
        "'torch.empty' is not on the allow-list",
    ),
    "add-out-buffer": (
        _graph({"op": "get_attr", "target": "buf"}, _fn("torch.add", X, 0, out={"node": 1})),
        {"buf": torch.zeros(64)},
        "'torch.add' with out=: a graph may not write into an existing tensor",
    ),
    "native-batch-norm-1-element-weight": (
        _graph(
            *({"op": "get_attr", "target": n} for n in ("w", "b", "rm", "rv")),
            _fn("torch.native_batch_norm", X, {"node": 1}, {"node": 2}, {"node": 3}, {"node": 4}, True, 0.1, 1e-5),
        ),
        {n: torch.ones(1) for n in ("w", "b", "rm", "rv")},
        "'torch.native_batch_norm' is not on the allow-list",
    ),
    "const-data-ptr": (
        _graph(_method("const_data_ptr", X)),
        None,
        "tensor method 'const_data_ptr' is not on the allow-list",
    ),
}
_ATTRS = {"empty-into-buffer": _BUF, "add-out-buffer": _BUF, "native-batch-norm-1-element-weight": _BN}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attacks_through_ops_are_refused_by_their_rule_and_the_worker_serves_on(cluster, attack):
    spec, state, needle = ATTACKS[attack]
    if attack in _ATTRS:
        spec = {**spec, "attrs": _ATTRS[attack]}
    reply = _raw_add_segment(cluster, "eve", spec, state)
    assert not reply.ok and reply.error_type == "SpecError", reply.error
    assert needle in reply.error, reply.error
    _serves_on(cluster, "eve")


def _graph_module(build) -> fx.GraphModule:
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(build(g, x))
    return fx.GraphModule(nn.Module(), g)


def test_a_graph_over_the_default_budget_is_refused_before_it_allocates(cluster):
    """torch.ones(2**28) (1 GiB) added to the input (another 1 GiB): refused on meta tensors, naming the node."""
    seg = _graph_module(lambda g, x: g.call_function(torch.add, (x, g.call_function(torch.ones, (2**28,)))))
    (w,) = cluster.connect("eve")
    try:
        w.add_segment("big", seg, None)  # a well-formed graph of allowed ops: installed
        for _ in range(2):  # refused each time, not only the first
            with pytest.raises(MemoryBudgetError) as e:
                w.probe("big", (1, 1))
            msg = str(e.value)
            assert "spec.nodes[2] (call_function torch.add)" in msg and "would allocate 2.00 GiB" in msg
            assert "budget for one forward of a segment is 1.00 GiB (splitnn worker --max-session-memory)" in msg
    finally:
        w.close()
    _serves_on(cluster, "eve")


def test_the_budget_follows_the_flag_and_the_input_shape(cluster):
    """--max-session-memory 256MiB: x.expand(2**20, -1).contiguous() runs at 4 features (16 MiB) and is refused
    at 128 (a 512 MiB expand, which the copy would allocate and any reduction would read), again and again."""
    seg = _graph_module(lambda g, x: g.call_method("contiguous", (g.call_method("expand", (x, 2**20, -1)),)))
    (w,) = cluster.connect("tight")
    try:
        w.add_segment("wide", seg, None)
        for _ in range(2):
            assert w.probe("wide", (1, 4)) == (2**20, 4)
            with pytest.raises(MemoryBudgetError, match=r"nodes\[1\] \(call_method expand\).*512\.00 MiB.*256\.00 MiB"):
                w.probe("wide", (1, 128))
    finally:
        w.close()
    _serves_on(cluster, "tight")


@pytest.mark.parametrize(
    "ref,needle",
    [
        ("mypkg.models:evilpkg.Dropper", "not an attribute chain"),
        ("mypkg.models:Reexported", "the class found is evilpkg.Dropper, defined outside what this party trusts"),
        ("torch.nn.modules.module:torch.ao.quantization.observer.NoopObserver", "not an attribute chain"),
        ("torch.nn.modules.module:Module", "not trusted here"),
    ],
    ids=["attribute-chain", "re-export", "default-trust-chain", "default-trust-is-the-layers"],
)
def test_trust_escapes_are_refused_and_nothing_runs(cluster, ref, needle):
    dropped = cluster.pkgs / f"pwned-{ref.replace(':', '-')}"
    spec = {"import": ref, "kwargs": {"path": str(dropped)}}
    reply = _raw_add_segment(cluster, "eve", spec)
    assert not reply.ok and reply.error_type == "TrustError", reply.error
    assert needle in reply.error, reply.error
    assert not dropped.exists()
    _serves_on(cluster, "eve")


def test_a_class_of_the_trusted_module_itself_is_built(cluster):
    state = {"lin.weight": torch.ones(2, 2), "lin.bias": torch.zeros(2)}
    reply = _raw_add_segment(cluster, "eve", {"import": "mypkg.models:Good", "kwargs": {"n": 2}}, state)
    assert reply.ok, reply.error
