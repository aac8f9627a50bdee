"""Token and mutual-TLS checks of networked workers."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

import splitnn
from splitnn.errors import PolicyError, WorkerError
from splitnn.models import tutorial_mlp
from splitnn.transport import TLSConfig
from splitnn.wire.proto import CALL, Command, Reply
from tests.helpers import assert_fit_equals_in_process, data_plane_answer, framed, toy_dataset
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]
cryptography = pytest.importorskip("cryptography")


def _raw_call(address: str, metadata, creds=None, override=None) -> grpc.RpcError | Reply:
    options = [("grpc.ssl_target_name_override", override)] if override else []
    channel = grpc.secure_channel(address, creds, options) if creds else grpc.insecure_channel(address)
    try:
        raw = channel.unary_unary(CALL, request_serializer=None, response_deserializer=None)(
            Command(op="hello").SerializeToString(), metadata=metadata, timeout=20
        )
        return Reply.FromString(raw)
    except grpc.RpcError as exc:
        return exc
    finally:
        channel.close()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("plain")) as cl:
        cl.start("bob")
        yield cl


def test_missing_or_wrong_token_is_unauthenticated(plain):
    address = plain.workers["bob"].address
    for metadata in (
        (),
        (("x-splitnn-party", "researcher"),),
        (("x-splitnn-token", "wrong"), ("x-splitnn-party", "researcher")),
        (("x-splitnn-token", plain.token[:-1]), ("x-splitnn-party", "researcher")),
    ):
        result = _raw_call(address, metadata)
        assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
    ok = _raw_call(address, (("x-splitnn-token", plain.token), ("x-splitnn-party", "researcher")))
    assert isinstance(ok, Reply) and ok.ok
    with pytest.raises(PolicyError, match="token"):
        splitnn.connect(plain.workers["bob"].url, token="not-the-token", timeout=20)
    assert plain.workers["bob"].alive()


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    from tests.transport.certs import make_ca, make_party

    root = tmp_path_factory.mktemp("tls")
    ca_path, ca_cert, ca_key = make_ca(root)
    certs = {n: make_party(root, n, ca_cert, ca_key) for n in ("alice", "bob", "claire", "researcher", "mallory")}
    _, rogue_cert, rogue_key = make_ca(root, "rogue-ca")
    rogue = make_party(root, "researcher-rogue", rogue_cert, rogue_key)
    with Cluster(root, tcp=False) as cl:
        for n in ("alice", "bob", "claire"):
            cert, key = certs[n]
            # claire's peer links come in over the TCP data plane (with TLS), the others' over gRPC
            plane = ("--data-listen", "127.0.0.1:0") if n == "claire" else ()
            cl.start(n, "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca_path), *plane)
        yield cl, ca_path, certs, rogue


def test_mutual_tls_trains_and_matches(tls_cluster):
    """Over gRPC peer streams (into alice and bob) and the TCP data plane (into claire), all with mutual TLS."""
    cl, ca, certs, _ = tls_cluster
    tls = TLSConfig(*certs["researcher"], ca)
    workers = [
        splitnn.connect(cl.workers[n].url, token=cl.token, name=n, tls=tls, timeout=60)
        for n in ("alice", "bob", "claire")
    ]
    assert workers[2].data_address is not None and workers[1].data_address is None
    try:
        torch.manual_seed(0)
        assert_fit_equals_in_process(tutorial_mlp(), workers, toy_dataset(64))
    finally:
        for w in workers:
            w.close()


def test_tls_identity_and_ca_mismatches_are_rejected(tls_cluster):
    cl, ca, certs, rogue = tls_cluster
    url, address = cl.workers["bob"].url, cl.workers["bob"].address
    md = (("x-splitnn-token", cl.token), ("x-splitnn-party", "researcher"))
    # a federation member's valid certificate, but it claims to be someone else
    with pytest.raises(PolicyError, match="certificate"):
        splitnn.connect(url, token=cl.token, name="bob", tls=TLSConfig(*certs["mallory"], ca), timeout=20)
    # the server is not who we meant to reach (TLS target name check)
    with pytest.raises((WorkerError, PolicyError)):
        splitnn.connect(url, token=cl.token, name="alice", tls=TLSConfig(*certs["researcher"], ca), timeout=3)
    # a certificate from another CA
    with pytest.raises((WorkerError, PolicyError)):
        splitnn.connect(url, token=cl.token, name="bob", tls=TLSConfig(*rogue, ca), timeout=3)
    # no client certificate at all, and plaintext against a TLS server
    no_cert = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    assert isinstance(_raw_call(address, md, no_cert, "bob"), grpc.RpcError)
    assert isinstance(_raw_call(address, md), grpc.RpcError)
    assert all(w.alive() for w in cl.workers.values())


def _tls_hello(address: str, token: str, ca, cert_key, party: str, server_name: str) -> bytes | None:
    """A raw TLS connection to a data plane with ``cert_key`` (None: no certificate), hello as ``party``; None when
    the TLS session or the connection fails."""
    import ssl

    from splitnn.transport import tcp

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca))
    if cert_key is not None:
        ctx.load_cert_chain(*map(str, cert_key))
    try:
        return data_plane_answer(
            address, framed(tcp.hello(token, party, None)), ssl_context=ctx, server_hostname=server_name
        )
    except (OSError, asyncio.TimeoutError):
        return None


def test_the_tls_data_plane_checks_certificates_both_ways(tls_cluster):
    cl, ca, certs, rogue = tls_cluster
    tls = TLSConfig(*certs["researcher"], ca)
    claire = splitnn.connect(cl.workers["claire"].url, token=cl.token, name="claire", tls=tls, timeout=60)
    try:

        def hello(cert_key, server_name="claire"):
            return _tls_hello(claire.data_address, cl.token, ca, cert_key, "bob", server_name)

        assert hello(certs["bob"]) == b"OK"
        answer = hello(certs["mallory"])  # a federation member's certificate, but it claims to be bob
        assert answer is not None and b"certificate is for ['mallory']" in answer
        assert hello(None) is None  # no certificate: no TLS session
        assert hello(rogue) is None  # a certificate of another CA
        assert hello(certs["bob"], server_name="alice") is None  # claire is not the party we meant to reach
    finally:
        claire.close()
    assert cl.workers["claire"].alive()


def test_a_misdirected_data_plane_address_gets_no_tensor(tls_cluster):
    """The researcher tells alice that bob's data plane is claire's: alice's TLS check (the listener must be the
    peer she meant to reach) refuses the connection, so bob's activations never reach claire that way."""
    cl, ca, certs, _ = tls_cluster
    tls = TLSConfig(*certs["researcher"], ca)
    workers = [
        splitnn.connect(cl.workers[n].url, token=cl.token, name=n, tls=tls, timeout=60)
        for n in ("alice", "bob", "claire")
    ]
    try:
        workers[1].data_address = workers[2].data_address
        torch.manual_seed(0)
        model = splitnn.SplitNN(tutorial_mlp(), workers)
        with pytest.raises(WorkerError, match="peer 'bob''s data plane at .* failed the TLS check"):
            model.fit(toy_dataset(64), epochs=1, batch_size=32, progress=False)
    finally:
        for w in workers:
            w.close()
    assert all(w.alive() for w in cl.workers.values())
