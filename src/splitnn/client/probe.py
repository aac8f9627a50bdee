"""Asking a worker how it is, without opening a session: the ``health`` command over one unary call.

``splitnn status`` (:mod:`splitnn.deploy.status`) calls :func:`probe` for every party. The call
carries the federation token (and, with TLS, the caller's certificate) like any other; the worker
answers from an anonymous session that holds nothing and is gone when the call ends.
"""

from __future__ import annotations

import json
import math

import grpc

from splitnn.accounting import RESEARCHER
from splitnn.client.channels import open_channel, parse_address
from splitnn.common.messages import error_from_reply, reply_result
from splitnn.errors import WireError, WorkerUnreachableError
from splitnn.transport.limits import Limits
from splitnn.transport.security import TLSConfig, call_metadata, check_token_text
from splitnn.wire.proto import CALL, Command, Reply

#: The health fields a worker's answer may carry, and their types (anything else is dropped).
_FIELDS = {
    "name": str,
    "version": str,
    "uptime": (int, float),
    "device": str,
    "sessions": int,
    "cert_expiry": (str, type(None)),
    "last_error": (dict, type(None)),
    "warning": str,
}


def probe(
    url: str,
    *,
    token: str,
    name: str | None = None,
    tls: TLSConfig | None = None,
    timeout: float = 5.0,
    caller: str = RESEARCHER,
) -> dict:
    """The ``health`` of the worker at ``url`` (a dict of :data:`_FIELDS`).

    ``name``: the party expected there (with TLS, its certificate must name it; default: the host).
    ``caller``: who asks (with mutual TLS, a name ``tls``'s certificate gives: a party's operator
    probes with the party's own kit).

    Raises :class:`~splitnn.errors.WorkerUnreachableError` when nothing answers within ``timeout``
    seconds, and the worker's error (e.g. :class:`~splitnn.errors.PolicyError` for a rejected token)
    otherwise.
    """
    address = parse_address(url)
    check_token_text(token)
    target = name or address.rsplit(":", 1)[0].strip("[]")
    channel = open_channel(address, limits=Limits(), tls=tls, target_name=target)
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise WorkerUnreachableError(f"no worker answers at {address} (within {timeout:g} s)") from None
        data = Command(seq=0, op="health", args_json="{}").SerializeToString()
        try:
            raw = channel.unary_unary(CALL, request_serializer=None, response_deserializer=None)(
                data, metadata=call_metadata(token, caller), timeout=timeout
            )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            detail = exc.details() if code else str(exc)
            raise WorkerUnreachableError(f"worker at {address}: {detail}") from None
        reply = Reply.FromString(raw)
        if not reply.ok:
            raise error_from_reply(reply, name or "?", address)
        try:
            result = reply_result(reply)
        except ValueError:
            raise WireError(f"worker at {address}: a health answer that is not JSON") from None
        return _checked(result, address)
    finally:
        channel.close()


def _checked(result: dict, address: str) -> dict:
    """The answer's known fields, type-checked (an answer from another party is not trusted)."""
    if not isinstance(result, dict) or not isinstance(result.get("name"), str):
        raise WireError(f"worker at {address}: a health answer without a name (an older splitnn?)")
    out = {}
    for key, kind in _FIELDS.items():
        value = result.get(key)
        if isinstance(value, kind) and not isinstance(value, bool):
            if isinstance(value, str):
                value = value[:256]
            if isinstance(value, float) and not math.isfinite(value):
                continue
            out[key] = value
    if isinstance(out.get("last_error"), dict):
        out["last_error"] = {k: str(v)[:128] for k, v in out["last_error"].items() if k in ("op", "type", "at")}
    return json.loads(json.dumps(out))
