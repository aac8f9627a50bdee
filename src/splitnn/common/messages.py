"""The conventions of the Session and Call messages that both ends of the control plane share.

What the protobuf ``Command``/``Reply`` envelopes (``wire/proto/splitnn.proto``) mean beyond their
fields lives here, once, so the researcher's and the worker's ends cannot drift apart:

* party names (:func:`check_party_name`) and the protocol version;
* session ids and their public tags (:func:`new_session_id`, :func:`check_session_id`,
  :func:`session_tag`; what a session is: :mod:`splitnn.server.sessions`);
* how many commands one coalesced ``batch`` may hold (:data:`MAX_BATCH`);
* which wire-counter kind a command's and a reply's bytes count as (:data:`COMMAND_KIND`, :data:`REPLY_KIND`);
* replies too large for one message, cut into parts (``Reply.more``) by the worker
  (:func:`split_reply`) and joined by the researcher (:func:`join_parts`);
* errors, turned into an error reply by the worker (:func:`fill_error`) and back into
  an exception by the researcher (:func:`error_from_reply`).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets

from splitnn import errors as _errors
from splitnn.errors import SplitNNError, WireError, WorkerError
from splitnn.wire.proto import Command, Reply

PROTOCOL_VERSION = 1
MAX_NAME = 64
#: Commands in one coalesced ``batch`` message (the worker refuses more).
MAX_BATCH = 1024
#: The last message of a researcher's stream that ends on purpose (a connection that breaks sends none,
#: and the worker keeps the stream for a resume: splitnn.server.replay). It gets no reply.
END_STREAM = "end_stream"

#: Wire-counter kind of a command's bytes, by op (everything else is "control").
COMMAND_KIND = {
    "add_segment": "weights",
    "set_state": "weights",
    "put": "features",
    "add_dataset": "data",
    "stage": "data",
}
#: Wire-counter kind of a successful reply's bytes, by op (everything else, and every error, is "control").
REPLY_KIND = {"fetch": "output", "get_state": "weights", "fetch_segment": "weights", "get_grads": "gradient"}


def check_party_name(name: object) -> str:
    """A party name: 1-64 printable ASCII characters, no spaces."""
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= MAX_NAME
        or not name.isascii()
        or not name.isprintable()
        or " " in name
    ):
        raise WireError(f"party name must be 1-{MAX_NAME} printable ASCII characters without spaces, got {name!r}")
    return name


# ---------------------------------------------------------------------------------- sessions
#: A session id: 32-128 characters from [A-Za-z0-9_-] (at least 128 bits when random).
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{32,128}")
#: A session tag: 32 lowercase hex digits.
_SESSION_TAG = re.compile(r"[0-9a-f]{32}")


def new_session_id() -> str:
    """A fresh random session id (128 bits, hex): unguessable, so it can stand for the session."""
    return secrets.token_hex(16)


def check_session_id(value: object) -> str:
    """A session id as the researcher gives it: 32-128 characters from ``[A-Za-z0-9_-]``."""
    if not isinstance(value, str) or not _SESSION_ID.fullmatch(value):
        raise WireError("a session id must be 32-128 characters from [A-Za-z0-9_-] (e.g. secrets.token_hex(16))")
    return value


def session_tag(session_id: str) -> str:
    """The public tag of a session: what workers show each other instead of the secret id.

    A one-way hash, so a peer that learns the tag (it must, to pull the session's tensors)
    cannot act as the researcher with it.
    """
    return hashlib.sha256(b"splitnn-session:" + session_id.encode()).hexdigest()[:32]


def check_session_tag(value: object) -> str:
    """A session tag: 32 lowercase hex digits."""
    if not isinstance(value, str) or not _SESSION_TAG.fullmatch(value):
        raise WireError("a session tag must be 32 lowercase hex digits")
    return value


def command_args(cmd: Command) -> dict:
    """A command's arguments: its ``args_json`` as a JSON object (``{}`` when empty); raises WireError."""
    try:
        args = json.loads(cmd.args_json) if cmd.args_json else {}
    except (ValueError, RecursionError) as exc:
        raise WireError(f"command arguments are not valid JSON: {exc}") from None
    if not isinstance(args, dict):
        raise WireError("command arguments must be a JSON object")
    return args


def reply_result(reply: Reply) -> dict:
    """A reply's result: its ``result_json`` decoded (``{}`` when empty)."""
    return json.loads(reply.result_json) if reply.result_json else {}


# ------------------------------------------------------------------------ replies in parts
def split_reply(reply: Reply, chunk_bytes: int) -> list[Reply]:
    """Cut a reply whose blobs exceed ``chunk_bytes`` into parts (see ``Reply.more`` in the .proto).

    The parts carry consecutive chunks of the concatenated blobs; the last carries the
    result, the ledger records and the blob sizes (``_blob_sizes``) to cut them apart again.
    """
    sizes = [len(b) for b in reply.blobs]
    if sum(sizes) <= chunk_bytes:
        return [reply]
    whole = b"".join(reply.blobs)
    parts = [
        Reply(seq=reply.seq, ok=True, more=True, blobs=[whole[i : i + chunk_bytes]])
        for i in range(0, len(whole), chunk_bytes)
    ]
    result = reply_result(reply)
    result["_blob_sizes"] = sizes
    last = Reply(seq=reply.seq, ok=True, result_json=json.dumps(result))
    last.transfers.extend(reply.transfers)
    return parts + [last]


def join_parts(reply: Reply, parts: list[bytes]) -> Reply:
    """Rebuild the blobs of a reply that came in parts (the inverse of :func:`split_reply`)."""
    result = reply_result(reply)
    sizes = result.pop("_blob_sizes", None)
    whole = b"".join(parts)
    if not isinstance(sizes, list) or sum(sizes) != len(whole):
        raise WorkerError("a reply in parts does not add up")
    blobs, pos = [], 0
    for n in sizes:
        blobs.append(whole[pos : pos + n])
        pos += n
    out = Reply(seq=reply.seq, ok=reply.ok, result_json=json.dumps(result) if result else "", blobs=blobs)
    out.transfers.extend(reply.transfers)
    return out


# ---------------------------------------------------------------------------------- errors
def fill_error(reply: Reply, exc: BaseException, worker: str) -> None:
    """Make ``reply`` an error reply for ``exc`` raised at ``worker``.

    splitnn's own errors (and torch's ``RuntimeError``/``IndexError``, which shape probes
    rely on) keep their class name; anything else travels as a ``WorkerError`` whose text
    names the original type. The text always names the worker.
    """
    reply.ok = False
    known = isinstance(exc, SplitNNError) or type(exc) in (RuntimeError, IndexError)
    reply.error_type = _public_name(exc) if known else "WorkerError"
    text = str(exc) if known else f"{type(exc).__name__}: {exc}"
    reply.error = text if f"{worker!r}" in text else f"worker {worker!r}: {text}"


def _public_name(exc: BaseException) -> str:
    """The name of the nearest class of ``exc`` that :mod:`splitnn.errors` defines, so that a server's own
    subclass (e.g. a lost peer link, a ``WorkerUnreachableError``) arrives as the class the caller can catch."""
    if not isinstance(exc, SplitNNError):
        return type(exc).__name__
    return next(c.__name__ for c in type(exc).__mro__ if getattr(_errors, c.__name__, None) is c)


def error_from_reply(reply: Reply, worker: str, address: str) -> Exception:
    """The exception an error reply stands for (a splitnn error class, ``RuntimeError`` or ``WorkerError``)."""
    cls = getattr(_errors, reply.error_type, None)
    if reply.error_type in ("RuntimeError", "IndexError"):
        return RuntimeError(reply.error)  # shape probes rely on torch's RuntimeError
    if not (isinstance(cls, type) and issubclass(cls, _errors.SplitNNError)):
        cls = WorkerError
    return cls(reply.error or f"worker {worker!r} at {address} failed")
