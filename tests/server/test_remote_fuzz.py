"""Random and mutated messages at a live worker: each gets an error, the worker keeps serving."""

from __future__ import annotations

import copy
import json

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import splitnn
from splitnn.common import serde
from splitnn.models import tutorial_mlp
from splitnn.transport import frames
from splitnn.wire.cut_codec import CutEncoder
from splitnn.wire.proto import CALL, PEER, SESSION, Command, Reply
from splitnn.wire.tensor_codec import encode_tensor
from tests.helpers import assert_same_weights, toy_dataset
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]
NAMES = ("alice", "bob", "claire")
VALUES = b"".join(bytes(p) for p in CutEncoder("int8").encode((torch.ones(2, 3), torch.arange(2))).wire_parts())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("fuzz")) as cl:
        for n in NAMES:
            cl.start(n, "--chunk-bytes", str(1 << 16))  # small messages: oversize is cheap to test
        yield cl


@pytest.fixture(scope="module")
def channel(cluster):
    ch = grpc.insecure_channel(cluster.workers["bob"].address)
    yield ch
    ch.close()


def _md(cluster, party="researcher"):
    return (("x-splitnn-token", cluster.token), ("x-splitnn-party", party))


def _valid_commands() -> list[bytes]:
    """Well-formed commands that must fail (nothing they name exists), as mutation seeds."""
    idx = encode_tensor(torch.arange(4))
    cmds = [
        Command(
            seq=1,
            op="forward",
            args_json=json.dumps({"key": "nope", "train": True, "id": 5, "src": {"dataset": "nope"}}),
            blobs=[idx],
        ),
        Command(
            seq=2,
            op="loss",
            args_json=json.dumps({"output": {"owner": "bob", "id": 99}, "dataset": "x", "loss": "nll", "train": True}),
            blobs=[idx],
        ),
        Command(
            seq=3,
            op="add_segment",
            args_json=json.dumps({"key": "k", "optimizer": {"name": "sgd"}}),
            blobs=[b'{"type": "Linear"}', b"\x00" * 16],
        ),
        Command(seq=4, op="backward", args_json=json.dumps({"key": "nope", "grad": {"owner": "bob", "id": 1}})),
        Command(seq=5, op="get_state", args_json=json.dumps({"key": "missing"})),
        Command(seq=6, op="probe", args_json=json.dumps({"key": "missing", "shape": [2, 3]})),
        Command(
            seq=7,
            op="loss",
            args_json=json.dumps(
                {"output": {"owner": "bob", "id": 98}, "dataset": "x", "loss": "mse", "train": False, "keep": "e1"}
            ),
            blobs=[idx],
        ),
        Command(seq=8, op="metrics", args_json=json.dumps({"keep": "e1", "names": ["accuracy", "auc"]})),
        # private set intersection: the datasets, sessions and peers they name do not exist
        Command(seq=9, op="psi_request", args_json=json.dumps({"session": "s", "dataset": "nope", "id": 11})),
        Command(
            seq=10,
            op="psi_reply",
            args_json=json.dumps({"dataset": "nope", "src": {"owner": "alice", "id": 3}, "id": 12}),
        ),
        Command(seq=11, op="psi_finish", args_json=json.dumps({"session": "s", "src": {"owner": "alice", "id": 4}})),
        Command(seq=12, op="psi_size", args_json=json.dumps({"name": "nope"})),
        Command(seq=13, op="psi_apply", args_json=json.dumps({"dataset": "nope", "parts": ["nope:a"]}), blobs=[idx]),
        Command(seq=14, op="psi_cancel", args_json=json.dumps({"name": "nope"})),
        Command(  # ids for a dataset: two, repeated, for three rows
            seq=15,
            op="add_dataset",
            args_json=json.dumps({"name": "n", "parts": ["features", "ids"]}),
            blobs=[encode_tensor(torch.zeros(3, 1)), b'["a", "a"]'],
        ),
        Command(seq=16, op="set_codecs", args_json=json.dumps({"key": "missing", "output": "int8", "input_grad": "x"})),
        Command(
            seq=17,
            op="probe",
            args_json=json.dumps({"key": "missing", "values": [{"shape": [2, 3], "dtype": "int64"}]}),
        ),
        Command(  # several values put as something else than features
            seq=18,
            op="put",
            args_json=json.dumps({"id": 3, "kind": "activation", "values": 2}),
            blobs=[serde.value_to_blob((torch.ones(2, 3), torch.arange(2)))],
        ),
    ]
    return [c.SerializeToString() for c in cmds]


def _call(channel, cluster, data: bytes):
    try:
        return Reply.FromString(
            channel.unary_unary(CALL, request_serializer=None, response_deserializer=None)(
                data, metadata=_md(cluster), timeout=20
            )
        )
    except grpc.RpcError as exc:
        return exc


def _is_error(result) -> bool:
    return isinstance(result, grpc.RpcError) or (isinstance(result, Reply) and not result.ok)


mutated = st.tuples(
    st.sampled_from(_valid_commands()),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
).map(lambda t: bytes(_mutate(*t)))


def _mutate(data: bytes, edits) -> bytearray:
    out = bytearray(data)
    for pos, value in edits:
        if pos % 3 == 0 and out:
            out[pos % len(out)] = value  # flip a byte
        elif pos % 3 == 1:
            del out[pos % (len(out) + 1) :]  # truncate
        else:
            out.insert(pos % (len(out) + 1), value)  # insert a byte
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=512), mutated))
def test_random_and_mutated_commands_get_errors(channel, cluster, data):
    assert _is_error(_call(channel, cluster, data))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.one_of(st.binary(max_size=256), mutated), min_size=1, max_size=4))
def test_random_session_streams_get_errors(channel, cluster, messages):
    stream = channel.stream_stream(SESSION, request_serializer=None, response_deserializer=None)
    replies = []
    try:
        for raw in stream(iter(messages), metadata=_md(cluster), timeout=20):
            replies.append(Reply.FromString(raw))
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        return
    assert replies and all(not r.ok for r in replies)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    frame=st.one_of(
        st.binary(max_size=128),
        st.builds(
            lambda k, i, tail: frames.request(k, i) + tail,
            st.sampled_from(["activation", "gradient", "psi"]),
            st.integers(0, 2**64 - 1),
            st.binary(min_size=1, max_size=8),
        ),
        st.builds(
            lambda i, total, body: frames.HEADER.pack(frames.PEER_MAGIC, frames.DATA, 1, 0, 0, i, total) + body,
            st.integers(0, 2**64 - 1),
            st.integers(0, 2**64 - 1),
            st.binary(max_size=64),
        ),
        st.builds(  # several values, plain or compressed, pushed unasked (and mutated)
            lambda codec, flags, tail: (
                frames.HEADER.pack(frames.PEER_MAGIC, frames.PUSH, 2, flags, codec, 1 << 40, len(VALUES) + len(tail))
                + VALUES
                + tail
            ),
            st.integers(0, 4),
            st.sampled_from([frames.FLAG_VALUES, frames.FLAG_VALUES | frames.FLAG_MORE]),
            st.binary(max_size=16),
        ),
    )
)
def test_random_peer_frames_get_errors(channel, cluster, frame):
    """Garbage frames abort the peer stream; an unknown tensor's request gets an ERROR frame."""
    stream = channel.stream_stream(PEER, request_serializer=None, response_deserializer=None)
    got = []
    try:
        for raw in stream(iter([frame]), metadata=_md(cluster, "mallory"), timeout=20):
            got.append(raw)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        return
    # a well-formed DATA frame nobody asked for is ignored; nothing else may come back but ERROR frames
    assert all(frames.parse(raw)[0].type == frames.ERROR for raw in got)


def test_oversized_and_truncated_messages_are_refused_and_server_keeps_serving(channel, cluster):
    big = Command(op="hello", blobs=[b"\x00" * (1 << 18)]).SerializeToString()  # > the 64 KiB chunk limit
    result = _call(channel, cluster, big)
    assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    truncated = _valid_commands()[0][:-7]
    assert _is_error(_call(channel, cluster, truncated))
    hello = _call(channel, cluster, Command(op="hello").SerializeToString())
    assert isinstance(hello, Reply) and hello.ok


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    op=st.sampled_from(["psi_request", "psi_reply", "psi_finish", "psi_size", "psi_apply", "psi_cancel"]),
    args=st.dictionaries(
        st.sampled_from(["session", "dataset", "name", "src", "id", "parts"]),
        st.none()
        | st.integers()
        | st.text(max_size=8)
        | st.lists(st.text(max_size=4), max_size=3)
        | st.fixed_dictionaries({"owner": st.sampled_from(["alice", "bob", "x"]), "id": st.integers(-1, 9)}),
        max_size=6,
    ),
    blobs=st.lists(st.binary(max_size=64), max_size=3),
)
def test_psi_commands_with_junk_arguments_get_errors(channel, cluster, op, args, blobs):
    """Every PSI command, with arguments of any shape: an error reply, never a crash or a hang."""
    data = Command(seq=1, op=op, args_json=json.dumps(args), blobs=blobs).SerializeToString()
    assert _is_error(_call(channel, cluster, data))


def test_training_still_works_after_the_fuzzing(cluster):
    """Runs after the fuzz tests (file order): a full step across all three workers, bit-identical.

    With 64 KiB messages, the 64x640 activation (160 KiB) crosses in chunks and the researcher's
    dataset upload is staged in chunks as well.
    """
    workers = [
        splitnn.connect(
            cluster.workers[n].url,
            token=cluster.token,
            name=n,
            timeout=60,
            limits=splitnn.transport.Limits(chunk_bytes=1 << 16),
        )
        for n in NAMES
    ]
    try:
        torch.manual_seed(9)
        segments = tutorial_mlp()
        twin = splitnn.SplitNN(copy.deepcopy(segments), [splitnn.VirtualWorker(n) for n in NAMES])
        model = splitnn.SplitNN(segments, workers)
        data = toy_dataset(128, seed=2)
        model.fit(data, epochs=1, batch_size=64, progress=False)
        twin.fit(data, epochs=1, batch_size=64, progress=False)
        assert_same_weights(model.collect(), twin.collect())
        assert model.ledger.links() == twin.ledger.links()
    finally:
        for w in workers:
            w.close()
    assert all(w.alive() for w in cluster.workers.values())
