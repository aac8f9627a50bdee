"""A party's side of private set intersection (the protocol: :mod:`splitnn.training.alignment`; the messages:
:mod:`splitnn.workers.psi_party`), under the policy's PSI rules.

A run takes only a dataset the party's operator placed (never one an intersection derived), at most
``max_psi_runs`` runs per dataset, messages to and from ``psi_peers`` only. The rows an intersection keeps and
their parts are derived from the dataset, and guarded as it is (:mod:`.datasets`).
State: ``_psi`` (the runs open here) and ``psi_runs`` (runs counted per dataset; a server shares one).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from splitnn.errors import WorkerError
from splitnn.workers.policy import check_batch_rows, check_psi
from splitnn.workers.psi_party import PsiParty, PsiRuns
from splitnn.workers.refs import TensorRef


class Intersection:
    """Private set intersection over the datasets held here (see :class:`~splitnn.workers.PsiWorker`)."""

    def _init_intersection(self) -> None:
        self._psi = PsiParty(self.name)
        # PSI runs each dataset took part in, for the policy's max_psi_runs (a server shares one between its sessions)
        self.psi_runs = PsiRuns()

    def psi_admit(self, dataset: str, *, peer: str | None = None) -> None:
        """Let ``dataset`` take part in a PSI run (with ``peer``, when given) under this party's policy, or raise
        PolicyError naming the rule; the first call of a run counts it."""
        held = self._dataset(dataset)
        if held.ids is None:
            self._psi.candidates(dataset, held)  # refused (naming the fix) before a run is counted
        if peer is not None:
            self.check_psi_peer(peer)
        operator = self._is_own(dataset) and dataset not in self._derived
        self._psi.open_run(
            dataset,
            self.psi_runs,
            lambda runs: self._guard(check_psi, self.policy, self.name, dataset=dataset, operator=operator, runs=runs),
        )

    def check_psi_peer(self, peer: str) -> None:
        """Refuse (PolicyError, audited) a PSI message to or from ``peer`` unless the policy's ``psi_peers``
        (by default its ``peers``) allows that party."""
        self._guard(check_psi, self.policy, self.name, peer=peer)

    def psi_request(self, session: str, dataset: str) -> TensorRef:
        """Open PSI ``session`` as the client over ``dataset``'s candidate ids; a ref to message 1."""
        self.psi_admit(dataset)
        return self._keep(_bytes_tensor(self._psi.request(session, dataset, self._dataset(dataset))), "psi")

    def psi_reply(self, dataset: str, request: TensorRef) -> TensorRef:
        """Pull a client's request (recorded as ``psi`` bytes) and answer it as the server; a ref to the reply."""
        self.psi_admit(dataset, peer=request.owner)
        payload = self._receive_bytes(request)
        return self._keep(_bytes_tensor(self._psi.reply(dataset, self._dataset(dataset), payload)), "psi")

    def psi_finish(self, session: str, reply: TensorRef) -> None:
        """Pull the server's reply (recorded as ``psi`` bytes) and narrow the candidates of the session's dataset."""
        self.check_psi_peer(reply.owner)
        self._psi.finish(session, self._receive_bytes(reply))

    def psi_size(self, dataset: str) -> int:
        """The number of candidate rows of ``dataset`` (all that the researcher learns)."""
        return self._psi.size(dataset, self._dataset(dataset))

    def psi_apply(self, dataset: str, parts: Mapping[str, torch.Tensor] | None = None) -> None:
        """Keep exactly the candidate rows of ``dataset``, in ascending id order; hold each of ``parts``
        (name -> positions in that order, each named ``f"{dataset}:PART"``) as a dataset too. They are derived
        from ``dataset``: the policy guards them as it guards ``dataset`` (a part of this party's own data holds at
        least ``min_batch_size`` distinct rows), and no later intersection takes them."""
        if self._is_own(dataset):
            size = self.psi_size(dataset)  # the intersection replaces the dataset: a view of it too
            self._guard(check_batch_rows, self.policy, self.name, dataset, size, size, "the intersection")
            for name, idx in (parts or {}).items():
                idx = torch.as_tensor(idx).reshape(-1)
                n, distinct = int(idx.numel()), int(torch.unique(idx).numel())
                self._guard(check_batch_rows, self.policy, self.name, dataset, n, distinct, f"part {name!r}")
        aligned = self._psi.apply(dataset, self._dataset(dataset), parts or {})
        source = self._source(dataset)
        self._data.update(aligned)
        self._derived.update(dict.fromkeys(aligned, source))  # own when their source is (see own_datasets)

    def psi_cancel(self, dataset: str) -> None:
        """Abandon the intersection of ``dataset`` (the held rows stay as they were)."""
        self._dataset(dataset)  # a dataset this worker does not hold is named in the error
        self._psi.cancel(dataset)

    def _receive_bytes(self, ref: TensorRef) -> bytes:
        tensor, _ = self._receive(ref, "psi", False)
        if tensor.dtype != torch.uint8 or tensor.dim() != 1:
            raise WorkerError(f"worker {self.name!r}: a PSI message from {ref.owner!r} must be a 1-D uint8 payload")
        return tensor.numpy().tobytes()

    def _forget_intersections(self) -> None:
        self._psi = PsiParty(self.name)  # (the runs counted stay counted)


def _bytes_tensor(data: bytes) -> torch.Tensor:
    """Bytes as a 1-D uint8 tensor, the form in which they wait in a worker's store for their receiver."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
