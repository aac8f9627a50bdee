"""PSI messages from another party are bytes a party must survive: malformed ones give a WireError."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from splitnn.common.operations import OPERATIONS
from splitnn.data.psi_messages import PsiClient, psi_reply
from splitnn.errors import WireError
from splitnn.transport.limits import Limits

IDS = [f"id-{i}" for i in range(20)]


def parse_metrics_args(args: dict) -> tuple:
    """A ``metrics`` command's arguments as the worker decodes them (the table of operations)."""
    decoded = OPERATIONS["metrics"].decode_args(args, [], limits=Limits())
    return decoded["keep"], decoded["names"]


def parse_metrics_result(result: dict, names: list[str]) -> dict:
    """A ``metrics`` reply as the researcher's client decodes it."""
    return OPERATIONS["metrics"].decode_result(result, [], limits=Limits(), args={"names": names})


def test_two_parties_find_their_common_ids():
    client = PsiClient(IDS[5:] + ["only-client"])
    hits = client.intersect(psi_reply(IDS[:12] + ["only-server"], client.request()))
    assert hits == list(range(7))  # id-5 .. id-11, as positions in the client's own list


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_malformed_requests_and_replies_are_refused(data):
    for call in (lambda: psi_reply(IDS, data), lambda: PsiClient(IDS).intersect(data)):
        try:
            call()
        except WireError:
            pass


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 2))
def test_tampered_replies_are_refused_or_harmless(noise, where):
    """Flip bytes of a genuine reply: the client refuses it or computes some subset, never crashes."""
    client = PsiClient(IDS)
    reply = bytearray(psi_reply(IDS[:10], client.request()))
    for i, b in enumerate(noise):
        pos = (where * 997 + i * 31) % len(reply)
        reply[pos] ^= b
    try:
        hits = client.intersect(bytes(reply))
    except WireError:
        return
    assert set(hits) <= set(range(len(IDS)))


@given(st.dictionaries(st.text(max_size=8), st.none() | st.integers() | st.text(max_size=8) | st.lists(st.text())))
def test_metrics_command_decoding_refuses_junk(args):
    try:
        keep, names = parse_metrics_args(args)
    except WireError:
        return
    assert isinstance(keep, str) and names


def test_metrics_reply_must_hold_exactly_the_names():
    assert parse_metrics_result({"values": {"auc": 0.5}}, ["auc"]) == {"auc": 0.5}
    for bad in ({}, {"values": {"auc": "x"}}, {"values": {"auc": 0.5, "mse": 1.0}}, {"values": {"auc": True}}):
        try:
            parse_metrics_result(bad, ["auc"])
        except WireError:
            continue
        raise AssertionError(f"accepted {bad}")
