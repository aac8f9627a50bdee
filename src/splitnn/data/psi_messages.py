"""Private set intersection between two parties, as plain bytes (ECDH, OpenMined's ``openmined-psi``).

The *client* learns which of its own ids the *server* holds; the server learns only how many ids the
client asked about. Messages (bytes, from one party to the other):

1. client -> server: :meth:`PsiClient.request` -- the client's ids hashed to curve points
   and blinded with the client's secret key;
2. server -> client: :func:`psi_reply` -- the server's ids blinded with *its* key (the
   "setup", sorted, so their order says nothing) and the client's points blinded again
   with the server's key (the "response");
3. the client removes its own blinding (:meth:`PsiClient.intersect`) and compares: equal
   points are common ids. Neither side ever sees the other's ids in the clear.

The setup is the exact (``RAW``) list, not a Bloom filter: a false positive would give two parties
different rows (about 33 bytes per id and message).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from splitnn.errors import ConfigurationError, WireError

__all__ = ["PsiClient", "psi_reply", "MAX_PSI_BYTES"]

#: The largest PSI message a party accepts (about 8 million ids).
MAX_PSI_BYTES = 1 << 28
_LEN = struct.Struct("<Q")


def _psi():
    try:
        import private_set_intersection.python as psi
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ConfigurationError(
            f"private set intersection needs the openmined-psi package: pip install 'openmined-psi>=2.0.3' ({exc})"
        ) from None
    return psi


class PsiClient:
    """The client side of one intersection over ``ids`` (a fresh secret key per instance)."""

    def __init__(self, ids: Sequence[str]) -> None:
        self._ids = list(ids)
        self._client = _psi().client.CreateWithNewKey(True)  # True: learn which ids, not only how many

    def request(self) -> bytes:
        """Message 1: the blinded ids, for the server."""
        return self._client.CreateRequest(self._ids).SerializeToString()

    def intersect(self, reply: bytes) -> list[int]:
        """Positions (into this client's ``ids``, ascending) of the ids the server holds too."""
        psi = _psi()
        setup_bytes, response_bytes = _split(reply)
        setup, response = psi.ServerSetup(), psi.Response()
        try:
            setup.ParseFromString(setup_bytes)
            response.ParseFromString(response_bytes)
        except Exception as exc:  # protobuf's DecodeError
            raise WireError(f"malformed PSI reply: {exc}") from None
        if len(response.encrypted_elements) != len(self._ids):
            raise WireError(
                f"malformed PSI reply: {len(response.encrypted_elements)} blinded ids for a request of {len(self._ids)}"
            )
        try:
            hits = self._client.GetIntersection(setup, response)
        except Exception as exc:  # the C++ layer refuses points that are not on the curve
            raise WireError(f"malformed PSI reply: {exc}") from None
        return sorted(int(i) for i in hits)


def psi_reply(ids: Sequence[str], request: bytes) -> bytes:
    """Message 2, the server's answer to a client's ``request`` over the server's ``ids``."""
    psi = _psi()
    if len(request) > MAX_PSI_BYTES:
        raise WireError(f"PSI request of {len(request)} bytes exceeds the {MAX_PSI_BYTES}-byte limit")
    req = psi.Request()
    try:
        req.ParseFromString(request)
    except Exception as exc:
        raise WireError(f"malformed PSI request: {exc}") from None
    if not req.reveal_intersection:
        raise WireError("PSI request: this protocol aligns rows, so the client must ask for the intersection itself")
    server = psi.server.CreateWithNewKey(True)
    try:
        setup = server.CreateSetupMessage(0.0, max(1, len(req.encrypted_elements)), list(ids), psi.DataStructure.RAW)
        response = server.ProcessRequest(req)
    except Exception as exc:
        raise WireError(f"malformed PSI request: {exc}") from None
    setup_bytes = setup.SerializeToString()
    return _LEN.pack(len(setup_bytes)) + setup_bytes + response.SerializeToString()


def _split(reply: bytes) -> tuple[bytes, bytes]:
    if len(reply) > MAX_PSI_BYTES or len(reply) < _LEN.size:
        raise WireError(f"malformed PSI reply of {len(reply)} bytes")
    (n,) = _LEN.unpack_from(reply)
    if n > len(reply) - _LEN.size:
        raise WireError("malformed PSI reply: its setup overruns the message")
    return reply[_LEN.size : _LEN.size + n], reply[_LEN.size + n :]
