"""The researcher's side of private set intersection: handles and sizes only; messages go party to party."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from splitnn.client.calls import encode_args as _args
from splitnn.client.calls import serialized as _serialized
from splitnn.workers.refs import TensorRef


class Psi:
    """Private set intersection at a worker (a component of :class:`~splitnn.client.RemoteWorker`)."""

    # -- private set intersection (PsiWorker; the protocol: splitnn.training.alignment) ---------------
    # Messages stay between the two parties: the receiver pulls the sender's message over their peer
    # stream (kind "psi") and records it on that link. The researcher sends only handles and learns sizes.
    @_serialized
    def psi_request(self, session: str, dataset: str) -> TensorRef:
        """Open PSI ``session`` as the client over ``dataset``'s candidate ids; a ref to the request (pipelined)."""
        ref = self._new_ref()
        self._send(
            "psi_request", *_args("psi_request", session=session, dataset=dataset, id=ref.id)
        )  # flushed: a peer pulls it
        return ref

    @_serialized
    def psi_reply(self, dataset: str, request: TensorRef) -> TensorRef:
        """Pull a client's request from its owner and answer it as the PSI server; a ref to the reply (pipelined)."""
        ref = self._new_ref()
        self._send("psi_reply", *_args("psi_reply", dataset=dataset, src=request, id=ref.id))
        return ref

    @_serialized
    def psi_finish(self, session: str, reply: TensorRef) -> None:
        """Pull the server's reply and narrow the candidates of the session's dataset (pipelined)."""
        self._send("psi_finish", *_args("psi_finish", session=session, src=reply))

    @_serialized
    def psi_apply(self, dataset: str, parts: Mapping[str, torch.Tensor] | None = None) -> None:
        """Keep exactly the candidate rows of ``dataset``, in ascending id order, and hold each of ``parts``
        (name -> positions in that order); at the worker this changes this session's datasets only."""
        self._call("psi_apply", dataset=dataset, parts=dict(parts or {}))

    @_serialized
    def psi_cancel(self, dataset: str) -> None:
        """Abandon the intersection of ``dataset`` (the held rows stay as they were).

        Called when an intersection failed: the errors its pipelined commands left at this worker
        belong to that failure (the caller is already raising it), so they are dropped here, and a
        later intersection starts clean.
        """
        for worker in (self, *self._remote_peers()):  # _request below would raise the peers' echoes too
            try:
                worker._stream.drain()
            except Exception:  # that failure's echo at this worker (a pull that could not be served, ...)
                pass
        self._call("psi_cancel", dataset=dataset)
