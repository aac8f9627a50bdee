"""A party's store of tensors waiting for their consumer, and every transfer in or out of it.

Tensors are not copied between in-process workers; the receiver records in the ledger the bytes a real
transfer moves (a value encoded by a codec: the bytes sent beside the raw size). A value from a peer on another
device is moved here when received (the engine's ``_move``); what the researcher gets comes back on the CPU.
State: ``_store`` (id -> (value, kind)), ``_ids`` (the next id), ``_peers`` (the in-process parties by name).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch

from splitnn.accounting import RESEARCHER
from splitnn.errors import PolicyError, WorkerError
from splitnn.wire.cut_codec import Arrived, CutEncoder, Encoded
from splitnn.workers.base import Worker
from splitnn.workers.checks import unreachable
from splitnn.workers.devices import RESEARCHER_DEVICE
from splitnn.workers.refs import TensorRef
from splitnn.workers.values import Value, check_values, nbytes


class TensorStore:
    """What a party holds for others (activations, gradients, puts, PSI messages) and how it hands it on."""

    def _init_store(self) -> None:
        self._store: dict[int, tuple[Value, str]] = {}
        self._ids = itertools.count(1)  # next() is atomic: threads sharing a worker get distinct ids
        self._peers: dict[str, Worker] = {}

    def connect_peers(self, peers: Mapping[str, Worker]) -> None:
        self._peers.update({n: w for n, w in peers.items() if n != self.name})

    def put(self, tensor: Value | Arrived, *, src: str, kind: str) -> TensorRef:
        """Receive ``tensor`` from ``src`` (see :class:`Worker`); a server hands over what came off the wire as an
        :class:`~splitnn.wire.cut_codec.Arrived`, whose sent and raw bytes are recorded (a gradient tuple in which
        nothing flows is not)."""
        if type(tensor) is Arrived:
            tensor, sent, raw = tensor
            if src != self.name and not (type(tensor) is tuple and all(t is None for t in tensor)):
                self.ledger.record(src, self.name, kind, sent, raw)
        else:
            if not isinstance(tensor, torch.Tensor):  # several values: a model input that is a tuple
                tensor = check_values(tensor, f"the {kind} put at {self.name!r}")
            if src != self.name:
                self.ledger.record(src, self.name, kind, nbytes(tensor))
        return self._keep(tensor if kind == "psi" else self._here(tensor), kind)  # PSI messages are bytes: CPU

    def fetch(self, ref: TensorRef, *, kind: str = "output") -> torch.Tensor:
        tensor, stored_kind = self._peek(ref)
        if type(tensor) is Encoded:  # encoded for a peer: the researcher gets what the peer would decode
            tensor = tensor.decode()
        if stored_kind in ("features", "labels", "psi", "weights"):
            raise PolicyError(f"worker {self.name!r} refuses to hand out {stored_kind} (its policy protects them)")
        if not self.policy.release_outputs:
            raise PolicyError(
                f"worker {self.name!r} refuses to hand out {stored_kind} (its policy protects them): the model's "
                f"outputs stay with it. Train and evaluate with fit / evaluate (the loss and metrics are computed "
                f"where the labels are); to let the researcher fetch outputs (predict, model.forward), start this "
                f"worker with `splitnn worker --allow-outputs` (in process: WorkerPolicy(release_outputs=True))"
            )
        del self._store[ref.id]
        self.ledger.record(self.name, RESEARCHER, kind, nbytes(tensor))
        # to the researcher's CPU; differentiably, so a loss computed there back-propagates into this worker
        return tensor if self.device == RESEARCHER_DEVICE else self._move(tensor, RESEARCHER_DEVICE)

    def keep(self, value: Value, kind: str) -> TensorRef:
        """Store ``value`` (recorded as nothing) as a ``kind`` tensor for a peer to :meth:`take`."""
        return self._keep(value, kind)

    def take(self, tensor_id: int, taker: str | None = None) -> Value:
        """Hand stored tensor ``tensor_id`` to peer ``taker``, once (the receiver records the transfer);
        PolicyError for raw features and labels, and when the policy does not let ``taker`` have it
        (``None``: the server hands it on itself, after its own checks)."""
        return self._take(tensor_id, taker)

    def stored_kind(self, tensor_id: int) -> str | None:
        """The kind of stored tensor ``tensor_id`` (``activation``, ``gradient``, ...), None if there is none."""
        stored = self._store.get(tensor_id)
        return stored[1] if stored is not None else None

    def holds_tensors(self) -> bool:
        """Whether any intermediate tensor is stored (activations, gradients, puts)."""
        return bool(self._store)

    def _keep(self, tensor: Value, kind: str, encoder: CutEncoder | None = None, feedback: bool = True) -> TensorRef:
        """Store ``tensor`` for its consumer; with ``encoder`` (a codec at the cut it crosses), encoded now, in the
        order this worker produces values (error feedback without feedback in evaluation)."""
        if encoder is not None:
            tensor = encoder.encode(tensor, feedback=feedback)
        tid = next(self._ids)
        self._store[tid] = (tensor, kind)
        return TensorRef(self.name, tid)

    def _peek(self, ref: TensorRef) -> tuple[torch.Tensor, str]:
        if ref.owner != self.name or ref.id not in self._store:
            raise WorkerError(f"worker {self.name!r} holds no tensor for {ref}")
        return self._store[ref.id]

    def _take(self, ref_id: int, taker: str | None = None, as_kind: str | None = None) -> torch.Tensor:
        """Hand a stored activation or gradient to peer ``taker`` (the peer records the bytes), if
        the policy lets ``taker`` have it (``None``: a server handing it on after its own check);
        ``as_kind``: what the taker receives it as (a PSI message or weights go out only as themselves)."""
        entry = self._store.pop(ref_id, None)
        if entry is None:
            raise WorkerError(f"worker {self.name!r} holds no tensor #{ref_id} (already consumed or released)")
        kind = entry[1]
        if kind in ("features", "labels"):
            self._store[ref_id] = entry
            raise PolicyError(f"worker {self.name!r} refuses to hand out {kind}")
        if as_kind is not None and _only_as_itself(kind, as_kind):
            self._store[ref_id] = entry
            raise WorkerError(f"worker {self.name!r}: tensor #{ref_id} is not a {as_kind}")
        if kind == "psi" and taker is not None and taker != self.name:
            try:
                self.check_psi_peer(taker)
            except PolicyError:
                self._store[ref_id] = entry
                raise
        # (the per-batch path: one set lookup when the model declared the taker adjacent)
        elif (
            taker is not None
            and taker != self.name
            and (self.policy.peers is not None or (self.neighbours is not None and taker not in self.neighbours))
        ):
            try:
                self.check_receiver(taker, f"its {kind}")
            except PolicyError:
                self._store[ref_id] = entry
                raise
        return entry[0]

    def _receive(self, ref: TensorRef, kind: str, train: bool) -> tuple[torch.Tensor, str]:
        """The value ``ref`` names, taken from this worker's store or a peer's, and how it arrived: ``"data"``,
        ``"fused"`` (attached to the sender's autograd graph) or ``"detached"``."""
        if ref.owner == self.name:
            tensor, stored_kind = self._store.pop(ref.id, (None, None))
            if tensor is None:
                raise WorkerError(f"worker {self.name!r} holds no tensor #{ref.id} (already consumed or released)")
            if _only_as_itself(stored_kind, kind):  # e.g. a PSI message run through a segment, to fetch its output
                self._store[ref.id] = (tensor, stored_kind)
                raise WorkerError(f"worker {self.name!r}: tensor #{ref.id} is not a {kind}")
            if stored_kind == "features":
                return tensor, "data"
            if type(tensor) is Encoded:  # a codec on a cut inside this worker: nothing crossed, decode only
                return tensor.decode(), "detached"
            return tensor, ("fused" if self.fuse and train else "detached")
        peer = self._peers.get(ref.owner)
        if peer is None:
            raise unreachable(self.name, ref.owner)
        if not isinstance(peer, TensorStore):
            raise WorkerError(f"in-process worker {self.name!r} cannot receive from non-local worker {ref.owner!r}")
        tensor = peer._take(ref.id, self.name, kind)
        if type(tensor) is Encoded:  # compressed at the sender: decode what a networked receiver would
            return self._decoded(tensor, ref.owner, kind, peer.device != self.device)
        if peer.device != self.device and kind != "psi":  # a cut between two devices (PSI messages are bytes)
            tensor = self._move(tensor, self.device)
        several = type(tensor) is tuple
        if not several or kind != "gradient" or any(t is not None for t in tensor):
            self.ledger.record(ref.owner, self.name, kind, nbytes(tensor))
        fused = train and kind == "activation" and self.fuse and peer.fuse and (several or tensor.requires_grad)
        return tensor, ("fused" if fused else "detached")

    def _decoded(self, encoded: Encoded, sender: str, kind: str, move: bool) -> tuple[Value, str]:
        """A value a peer encoded for this cut: decoded, recorded (sent and raw bytes), never fused."""
        value = encoded.decode()
        if move:
            value = self._move(value, self.device)
        if encoded.nbytes or any(e is not None for e in encoded.entries):  # (a gradient tuple of Nones: nothing)
            self.ledger.record(sender, self.name, kind, encoded.nbytes, encoded.raw)
        return value, "detached"

    def _here(self, value: Value) -> Value:
        """``value`` on this worker's device (as it is when it is there already)."""
        if type(value) is tuple:
            if all(t is None or t.device == self.device for t in value):
                return value
        elif value.device == self.device:
            return value
        return self._move(value, self.device)

    def _check_readable(self, what: str) -> None:
        if self.device.type == "meta":
            raise WorkerError(
                f"worker {self.name!r} computes on the 'meta' device (shapes only): it holds no {what} to hand "
                "out; give it a real device ('cpu', 'cuda:0')"
            )


def _only_as_itself(stored: str | None, kind: str) -> bool:
    """Whether a tensor stored as ``stored`` may not be received as ``kind``: PSI messages and weights go only
    to a receiver asking for them as such, and such a receiver gets nothing else (as a server's pulls)."""
    return (stored == "psi") != (kind == "psi") or (stored == "weights") != (kind == "weights")
