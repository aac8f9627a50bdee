"""The researcher's side of weights between parties: hand-off peer to peer, averaging at a worker, gradients."""

from __future__ import annotations

from collections.abc import Sequence

from splitnn.client.calls import Calls
from splitnn.client.calls import encode_args as _args
from splitnn.client.calls import serialized as _serialized
from splitnn.errors import WorkerError
from splitnn.workers.checks import (
    check_averaging,
    unreachable,
)


class Averaging:
    """Weights hand-off and averaging at a worker (a component of :class:`~splitnn.client.RemoteWorker`)."""

    # -- optional capabilities (the topologies and baselines of splitnn.training) -----------------
    @_serialized
    def send_state(self, key: str, dst: str, *, dst_key: str | None = None) -> None:
        """Hand segment ``key``'s weights straight to peer ``dst`` (:class:`~splitnn.workers.PeerStateWorker`).

        Two pipelined commands: this worker snapshots the weights (safetensors) in its command
        order, i.e. after everything sent to it before; ``dst`` pulls them over the two workers'
        peer stream, loads them into ``dst_key`` (default ``key``) in *its* command order and
        records them as ``weights`` on the link self -> ``dst``. The researcher never holds them.
        Errors surface at the next synchronous call, like those of ``forward``.
        """
        target = self if dst == self.name else self._peers.get(dst)
        if target is None:
            raise unreachable(self.name, dst)
        if not isinstance(target, Calls):
            raise WorkerError(f"remote worker {self.name!r} cannot send weights to in-process worker {dst!r}")
        ref = self._new_ref()
        self._send(
            "export_state", *_args("export_state", key=key, id=ref.id)
        )  # flushed: the puller may be waiting for it
        target._send("load_state", *_args("load_state", key=dst_key or key, src=ref), flush=False)

    @_serialized
    def average_states(self, keys: Sequence[str], weights: Sequence[float], *, into: Sequence[str]) -> None:
        """Load the weighted average of segments ``keys`` into every segment of ``into``, at the worker
        (:class:`~splitnn.workers.AveragingWorker`; SplitFed's aggregation).

        Only the keys and weights travel; the worker averages segments it hosts, so nothing is
        recorded. Waits for the answer (after the weights sent to it before, e.g. by
        :meth:`send_state`, are loaded), so a bad key, weight or shape is raised here.
        """
        keys, weights, into = check_averaging(keys, weights, into, self.name)
        self._call("average_states", keys=keys, weights=weights, into=into)
