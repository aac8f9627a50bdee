"""Session ids are the worker's, sessions are limited per researcher, and a tag names one session or none
(issue 24, item 6). Real ``splitnn worker`` processes throughout."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import grpc
import pytest
from torch import nn

import splitnn
from splitnn.client import SessionNotFound
from splitnn.common.messages import session_tag
from splitnn.errors import PolicyError, WorkerError
from splitnn.testing import floods
from splitnn.transport import frames, tcp
from splitnn.wire.proto import CALL, PEER, Command, Reply
from tests.helpers import data_plane_answer, framed
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]


def _call(address: str, token: str, *, op: str = "hello", extra=(), party: str = "researcher"):
    """A raw unary call: the Reply and the trailing metadata, or the RpcError."""
    md = [("x-splitnn-token", token), ("x-splitnn-party", party), *extra]
    with grpc.insecure_channel(address) as ch:
        try:
            raw, call = ch.unary_unary(CALL, request_serializer=None, response_deserializer=None).with_call(
                Command(op=op, args_json=json.dumps({})).SerializeToString(), metadata=md, timeout=60
            )
        except grpc.RpcError as exc:
            return exc
    return Reply.FromString(raw), dict(call.trailing_metadata() or ())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("session-ids")
    with Cluster(root, tcp=True) as cl:
        tokens = root / "RESEARCHERS"
        cl.researchers = {"mallory": secrets.token_hex(16), "carol": secrets.token_hex(16)}
        tokens.write_text("# researchers' own tokens\n" + "".join(f"{n} {t}\n" for n, t in cl.researchers.items()))
        cl.start("bob", "--max-sessions", "5", "--max-sessions-per-researcher", "2", "--researcher-tokens", str(tokens))
        yield cl
        assert cl.workers["bob"].alive(), "the worker died"


def test_the_worker_issues_session_ids_and_refuses_client_chosen_ones(cluster):
    address = cluster.workers["bob"].address
    # a session id the worker did not issue names nothing: refused, never created
    chosen = _call(address, cluster.token, extra=[("x-splitnn-session", "a" * 32)])
    assert isinstance(chosen, grpc.RpcError) and chosen.code() == grpc.StatusCode.NOT_FOUND
    assert "never issued (session ids are issued by the worker)" in chosen.details()
    with pytest.raises(SessionNotFound, match="session ids are issued by the worker"):
        splitnn.connect(cluster.workers["bob"].url, token=cluster.token, session="a" * 32, timeout=60)
    # a hello asking for a new session gets the id the worker chose
    reply, trailing = _call(address, cluster.token, extra=[("x-splitnn-new-session", "1")])
    issued = trailing.get("x-splitnn-session")
    assert reply.ok and issued is not None and len(issued) == 32 and issued != "a" * 32
    resumed = _call(address, cluster.token, extra=[("x-splitnn-session", issued)])
    assert not isinstance(resumed, grpc.RpcError) and resumed[0].ok
    # only a hello that names no session may ask for one
    for extra, op in (
        ([("x-splitnn-new-session", "1"), ("x-splitnn-session", issued)], "hello"),
        ([("x-splitnn-new-session", "1")], "stats"),
    ):
        refused = _call(address, cluster.token, op=op, extra=extra)
        assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.INVALID_ARGUMENT, op
        assert "a new session is asked for by a hello call" in refused.details()
    # the client resumes an issued id
    (w,) = cluster.connect("bob")
    try:
        w.add_segment("k", nn.Linear(2, 2), "sgd")
        again = splitnn.connect(cluster.workers["bob"].url, token=cluster.token, session=w.session, timeout=60)
        assert again.session == w.session and again.session_tag == session_tag(w.session)
        assert set(again.get_state("k")) == {"weight", "bias"}
        again.close()
    finally:
        w.close(end_session=True)


def _open(cluster: Cluster, researcher: str | None, **kw) -> splitnn.client.RemoteWorker:
    token = cluster.token if researcher is None else cluster.researchers[researcher]
    return splitnn.connect(cluster.workers["bob"].url, token=token, timeout=60, **kw)


def _open_once_closed(cluster: Cluster, researcher: str) -> splitnn.client.RemoteWorker:
    """``_open``, again while the worker has not yet seen a session the researcher just ended end."""
    deadline = time.monotonic() + 60  # a guard against hangs, not a measurement
    while True:
        try:
            return _open(cluster, researcher)
        except WorkerError as exc:
            if "limit per researcher" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_one_researcher_cannot_take_every_session_slot(cluster):
    """At --max-sessions 5 and --max-sessions-per-researcher 2, mallory (her own token) holding two open sessions is
    refused a third, naming the per-researcher limit, while carol and the federation token's holders still get
    theirs (before: one token holder's idle sessions locked every other researcher out)."""
    held = [_open(cluster, "mallory"), _open(cluster, "mallory")]
    others = []
    try:
        with pytest.raises(WorkerError, match="limit per researcher .*--max-sessions-per-researcher"):
            _open(cluster, "mallory")
        others = [_open(cluster, "carol"), _open(cluster, None)]
        # a session is resumed only by the identity that opened it
        with pytest.raises(PolicyError, match="resumed only by the researcher identity"):
            _open(cluster, "carol", session=held[0].session)
        # a session mallory ends makes room for her next one
        held[0].add_segment("k", nn.Linear(2, 2), "sgd")
        held.pop(0).close(end_session=True)
        held.append(_open_once_closed(cluster, "mallory"))
        assert held[-1].session is not None
        # the worker's total limit still holds: 2 mallory + 1 carol + 1 federation = 4 open, one slot left
        others.append(_open(cluster, "carol"))
        with pytest.raises(WorkerError, match="--max-sessions\\)"):
            _open(cluster, None)
    finally:
        for w in held + others:
            w.close(end_session=True)


def test_a_researchers_own_token_never_admits_a_peer(cluster):
    token = cluster.researchers["mallory"]
    refused = _call(cluster.workers["bob"].address, token, party="claire")
    assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.UNAUTHENTICATED
    answer = data_plane_answer(cluster.data_listen("bob"), framed(tcp.hello(token, "claire", None)))
    assert answer is not None and b"wrong federation token" in answer


def test_a_peer_stream_naming_an_unknown_session_tag_reaches_no_session(cluster):
    """A peer (with the federation token) dials bob's data plane naming a well-formed tag of no session, or none:
    its pulls are answered 'no session for this stream' and its pushes refused, even right after a researcher
    opened a session there (a lookup falling back to the newest session would serve that one)."""
    (victim,) = cluster.connect("bob")
    try:
        victim.add_segment("k", nn.Linear(2, 2), "sgd")
        for tag in (secrets.token_hex(16), None):

            async def main(tag=tag) -> list[bytes]:
                async with floods.peer_stream(cluster.data_listen("bob"), cluster.token, "eve", tag) as stream:
                    await stream.send(frames.request("activation", 1))
                    raw = await asyncio.wait_for(stream.read(), 30)
                    return [bytes(raw)]

            (raw,) = asyncio.run(main())
            hdr, chunk = frames.parse(raw)
            assert hdr.type == frames.ERROR and b"has no session for this stream" in bytes(chunk), bytes(chunk)
            acks = asyncio.run(floods.topk_bomb(cluster.data_listen("bob"), cluster.token, tag, 1, 1024))
            assert acks == []
        log = cluster.workers["bob"].log.read_text(errors="replace")
        assert "has no session for the stream" in log
    finally:
        victim.close(end_session=True)


def test_grpc_peer_streams_naming_an_unknown_tag_reach_no_session(cluster):
    (victim,) = cluster.connect("bob")
    try:
        md = (
            ("x-splitnn-token", cluster.token),
            ("x-splitnn-party", "eve"),
            ("x-splitnn-peer-session", secrets.token_hex(16)),
        )
        with grpc.insecure_channel(cluster.workers["bob"].address) as ch:
            call = ch.stream_stream(PEER, request_serializer=None, response_deserializer=None)(
                iter([frames.request("activation", 1)]), metadata=md, timeout=30
            )
            raw = next(call)
        hdr, chunk = frames.parse(raw)
        assert hdr.type == frames.ERROR and b"has no session for this stream" in bytes(chunk)
    finally:
        victim.close(end_session=True)
