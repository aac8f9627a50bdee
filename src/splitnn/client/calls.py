"""The researcher's calls on a worker: queued or waited for, and the methods the table of operations generates.

:class:`Calls` sends commands on the worker's ordered stream (pipelined: :meth:`Calls._send`; waited
for: :meth:`Calls._request`, after every worker of the model is idle) and calls a declared operation
(:meth:`Calls._call`, from :mod:`splitnn.common.operations`). :func:`operation_methods` gives a class a
method for every declared operation that names one and that the class does not write itself.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from splitnn.common.messages import error_from_reply, reply_result
from splitnn.common.operation import Operation
from splitnn.common.operations import OPERATIONS
from splitnn.workers.epoch import EpochHandle
from splitnn.workers.refs import TensorRef

if TYPE_CHECKING:
    from splitnn.client.remote import RemoteWorker


def serialized(method):
    """Run ``method`` holding the worker's lock: concurrent callers take turns (see "Threads" in
    :mod:`splitnn.client.remote`)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


def encode_args(op_name: str, /, **values: Any) -> tuple[dict, list[bytes]]:
    """The arguments and blobs of declared operation ``op_name`` for ``values``, for a method that sends the
    command itself (pipelined with a flush of its own, or installed again on reconnection)."""
    return OPERATIONS[op_name].encode_args(**values)


class Calls:
    """Sending commands and calling declared operations (a component of :class:`~splitnn.client.RemoteWorker`)."""

    def _send(
        self, op: str, args: dict, blobs: list[bytes] = (), *, flush: bool = True, handle: EpochHandle | None = None
    ) -> None:
        """Queue a command (see :meth:`CommandStream.send`); nobody waits for its answer here."""
        self._stream.send(op, args, blobs, flush=flush, handle=handle)

    @serialized
    def drain(self) -> None:
        """Send what is queued, wait until every command is answered; raise the first error."""
        self._stream.drain()

    @serialized
    def flush(self) -> None:
        """Put the commands queued for this worker on the wire now, without waiting for their answers.

        Pipelined commands (``forward``, ``zero_grad``, ...) otherwise wait in a buffer for the next
        flushing call; a caller that wants the worker busy while it does something else flushes.
        """
        self._stream.flush()

    def _request(self, op: str, args: dict, blobs: list[bytes] = ()) -> tuple[dict, list[bytes]]:
        """Send a command and wait for its answer (after every worker of the model is idle)."""
        for peer in self._remote_peers():  # (their streams, not their locks: another thread may be using them)
            peer._stream.flush()  # what this command waits on may still be queued at a peer
        reply = self._stream.wait(self._stream.send(op, args, blobs))
        for peer in self._remote_peers():
            peer._stream.drain()
        self.drain()
        if not reply.ok:
            raise error_from_reply(reply, self.name, self.address)
        return reply_result(reply), list(reply.blobs)

    def _call(self, op_name: str, /, **values: Any) -> Any:
        """Call declared operation ``op_name`` with ``values`` (by argument field): pipelined ones return None,
        the others their decoded result."""
        op = OPERATIONS[op_name]
        args, blobs = op.encode_args(**values)
        if not op.wait:
            self._send(op_name, args, blobs, flush=op.flush)
            return None
        result, out = self._request(op_name, args, blobs)
        return op.decode_result(result, out, limits=self.limits, args=values)

    def _remote_peers(self) -> list[RemoteWorker]:
        return [p for p in self._peers.values() if isinstance(p, Calls) and p is not self]

    def _new_ref(self) -> TensorRef:
        return TensorRef(self.name, next(self._ids))


def _method(op: Operation):
    signature = op.signature()
    params = list(signature.parameters.values())[1:]
    names = frozenset(p.name for p in params)
    positional = tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)
    defaults = {p.name: p.default for p in params if p.default is not p.empty}

    def call(self, *args: Any, **kwargs: Any) -> Any:
        # the usual call (``zero_grad(key)``) without Signature.bind, which costs more than the rest of the call;
        # anything else bound as Python binds it, with its TypeError for a bad call
        fast = len(args) <= len(positional) and names.issuperset(kwargs)
        if fast and kwargs.keys().isdisjoint(positional[: len(args)]):
            values = {**defaults, **dict(zip(positional, args)), **kwargs}
        else:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            del values["self"]
        return self._call(op.name, **values)

    call.__name__ = call.__qualname__ = op.method
    call.__doc__ = op.doc
    call.__signature__ = signature
    return serialized(call)


def operation_methods(cls: type) -> type:
    """Give ``cls`` a method for every declared operation that names one (``Operation.method``) and that
    ``cls`` does not define itself."""
    for op in OPERATIONS.values():
        if op.method is not None and not hasattr(cls, op.method):
            setattr(cls, op.method, _method(op))
    return cls
