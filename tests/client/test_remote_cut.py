"""splitnn.cut's segments across `splitnn worker` processes: an fx segment travels as its graph (JSON), custom
blocks as trusted imports, weights as safetensors; training matches the in-process run bit for bit. A worker
without the trust refuses, naming the class and the flag; malformed graphs get an error and the worker serves on.
Cuts that several values cross, over the network: tests/client/test_remote_values.py."""

from __future__ import annotations

import json

import grpc
import pytest
import torch

import splitnn
from splitnn.errors import TrustError
from splitnn.wire.proto import CALL, Command, Reply
from splitnn.wire.state_codec import encode_state
from tests.cut_models import BasicBlock, SmallResNet
from tests.helpers import toy_dataset
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

NAMES = ("alice", "bob", "claire")
TRUST = ("--trust", "tests.cut_models")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("cut")) as cl:
        for n in NAMES:
            cl.start(n, *TRUST)
        cl.start("dave")  # trusts nothing but torch.nn and the registry
        yield cl
        assert all(w.alive() for w in cl.workers.values()), "a worker died during the tests"


def _connect(cluster, names):
    return [splitnn.connect(cluster.workers[n].url, token=cluster.token, name=n, timeout=60) for n in names]


@pytest.fixture()
def remote(cluster):
    workers = _connect(cluster, NAMES)
    yield workers
    for w in workers:
        w.close()


def _state_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize(
    "leaves,ship", [((BasicBlock,), True), ((), False)], ids=["trusted-blocks-shipped", "torch-graph-per-op"]
)
def test_cut_resnet_trains_across_workers_as_in_process(remote, leaves, ship):
    torch.manual_seed(0)
    model = SmallResNet(width=4)
    data = toy_dataset(96, shape=(1, 12, 12), seed=2)
    opt = "sgd:lr=0.05,momentum=0.9"
    at = ["layer1", "layer2"]  # block boundaries: one tensor crosses each cut

    split = splitnn.SplitNN(splitnn.cut(model, at=at, leaves=leaves), remote, optimizer=opt, ship_epochs=ship)
    history = split.fit(data, epochs=2, batch_size=32, seed=4, progress=False)
    twin = splitnn.SplitNN(
        splitnn.cut(model, at=at, leaves=leaves), [splitnn.VirtualWorker(n) for n in NAMES], optimizer=opt
    )
    twin_history = twin.fit(data, epochs=2, batch_size=32, seed=4, progress=False)

    assert history.losses() == twin_history.losses()
    _state_equal(split.collect_state(), twin.collect_state())
    collected = split.collect()  # rebuilt at the researcher, trusting the classes it sent itself
    model.load_state_dict(collected.state_dict())  # loads into the user's own model
    _state_equal(model.state_dict(), twin.collect_state())
    assert [l for l in split.ledger.links() if l.kind in ("activation", "gradient")] == [
        l for l in twin.ledger.links() if l.kind in ("activation", "gradient")
    ]


def test_worker_without_trust_refuses_naming_the_class_and_the_flag(cluster):
    workers = _connect(cluster, ("alice", "dave", "claire"))
    try:
        segments = splitnn.cut(SmallResNet(width=4), at=["layer1", "layer2"], leaves=[BasicBlock])
        with pytest.raises(TrustError) as e:
            splitnn.SplitNN(segments, workers)
        msg = str(e.value)
        assert "'dave'" in msg and "tests.cut_models.BasicBlock" in msg
        assert "splitnn worker --trust tests.cut_models" in msg
        # the same worker takes a cut made of torch.nn layers only
        plain = splitnn.cut(SmallResNet(width=4), at=["layer1", "layer2"])
        model = splitnn.SplitNN(plain, workers)
        assert workers[1].probe(model.stages[1].key, (2, 4, 12, 12)) == (2, 4, 12, 12)
    finally:
        for w in workers:
            w.close()


def _add_segment(cluster, name: str, spec: dict) -> Reply:
    with grpc.insecure_channel(cluster.workers[name].address) as ch:
        cmd = Command(seq=1, op="add_segment", args_json=json.dumps({"key": "fuzz", "optimizer": None}))
        cmd.blobs.extend([json.dumps(spec).encode(), encode_state({})])
        md = (("x-splitnn-token", cluster.token), ("x-splitnn-party", "researcher"))
        raw = ch.unary_unary(CALL, request_serializer=None, response_deserializer=None)(
            cmd.SerializeToString(), metadata=md, timeout=20
        )
    return Reply.FromString(raw)


def _g(*nodes, modules=None):
    return {"type": "Graph", "modules": modules or {}, "attrs": {}, "nodes": [{"op": "placeholder"}, *nodes]}


OUT = {"op": "output", "args": [{"node": 1}]}


@pytest.mark.parametrize(
    "spec,error",
    [
        (_g({"op": "call_function", "target": "os.system", "args": ["id"], "kwargs": {}}, OUT), "SpecError"),
        (_g({"op": "call_function", "target": "torch.relu", "args": [{"node": 2}], "kwargs": {}}, OUT), "SpecError"),
        (_g({"op": "exec", "target": "x"}, OUT), "SpecError"),
        (
            _g(
                {"op": "call_module", "target": "b", "args": [{"node": 0}], "kwargs": {}},
                OUT,
                modules={"b": {"import": "tests.cut_models:BasicBlock", "kwargs": {"in_planes": 2, "planes": 2}}},
            ),
            "TrustError",
        ),
    ],
    ids=["os-system", "cycle", "unknown-op", "untrusted-import"],
)
def test_malformed_graphs_get_an_error_and_the_worker_serves_on(cluster, spec, error):
    reply = _add_segment(cluster, "dave", spec)
    assert not reply.ok and reply.error_type == error, reply.error
    assert cluster.workers["dave"].alive()
    (dave,) = _connect(cluster, ("dave",))
    try:
        dave.add_segment("after", splitnn.cut(SmallResNet(width=2), at=["layer2"])[0], None)
        assert dave.probe("after", (1, 1, 12, 12)) == (1, 2, 12, 12)
    finally:
        dave.close()
