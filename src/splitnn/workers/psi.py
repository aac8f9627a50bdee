"""A worker's side of private set intersection (see :mod:`splitnn.training.psi` for the protocol).

Per dataset, a party keeps its *candidate* rows: at first every row it holds ids for;
each intersection it runs as the client narrows them to the rows whose ids the other
party holds too. Committing (:meth:`PsiParty.apply`) keeps exactly the candidate rows,
ordered by id, so that every party that ends with the same set of ids also ends with
the same row order -- without any id crossing a link in the clear.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from splitnn.data.psi import PsiClient, psi_reply
from splitnn.errors import WorkerError
from splitnn.workers.held import HeldData


class PsiParty:
    """Candidate rows per dataset and the open client sessions of one worker."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self._candidates: dict[str, list[int]] = {}
        self._sessions: dict[str, tuple[str, PsiClient, list[int]]] = {}

    def candidates(self, dataset: str, held: HeldData) -> list[int]:
        """The rows of ``dataset`` still in the running (all rows before any intersection)."""
        if held.ids is None:
            raise WorkerError(
                f"worker {self.worker!r} holds no sample ids for dataset {dataset!r}; give them with "
                f"add_dataset({dataset!r}, ..., ids=[...]) (or load a table with an id column)"
            )
        return self._candidates.get(dataset, list(range(len(held.ids))))

    def request(self, session: str, dataset: str, held: HeldData) -> bytes:
        """Start an intersection as the client over the candidate ids; message 1 for the server."""
        if session in self._sessions:
            raise WorkerError(f"worker {self.worker!r}: PSI session {session!r} is already open")
        positions = self.candidates(dataset, held)
        client = PsiClient([held.ids[p] for p in positions])
        self._sessions[session] = (dataset, client, positions)
        return client.request()

    def reply(self, dataset: str, held: HeldData, request: bytes) -> bytes:
        """Answer a client's request as the server, over this party's candidate ids."""
        positions = self.candidates(dataset, held)
        return psi_reply([held.ids[p] for p in positions], request)

    def finish(self, session: str, reply: bytes) -> None:
        """Read the server's reply: the candidates shrink to the rows whose ids the server holds."""
        opened = self._sessions.pop(session, None)
        if opened is None:
            raise WorkerError(f"worker {self.worker!r}: no open PSI session {session!r}")
        dataset, client, positions = opened
        self._candidates[dataset] = [positions[i] for i in client.intersect(reply)]

    def size(self, dataset: str, held: HeldData) -> int:
        """How many candidate rows ``dataset`` has (after the intersections: the intersection's size)."""
        return len(self.candidates(dataset, held))

    def apply(self, dataset: str, held: HeldData, parts: Mapping[str, torch.Tensor]) -> dict[str, HeldData]:
        """The datasets to hold once the intersection is committed: ``dataset`` itself (the candidate rows in
        ascending id order) and each of ``parts`` (its rows at the given positions)."""
        if dataset not in self._candidates:
            raise WorkerError(f"worker {self.worker!r}: no intersection was computed for dataset {dataset!r}")
        positions = self._candidates.pop(dataset)
        order = sorted(positions, key=lambda p: held.ids[p])
        aligned = held.select(torch.tensor(order, dtype=torch.int64))
        out = {dataset: aligned}
        for name, idx in parts.items():
            idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
            if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= len(order):
                raise WorkerError(
                    f"worker {self.worker!r}: part {name!r} of dataset {dataset!r} needs 1.. positions in "
                    f"0..{len(order) - 1}"
                )
            out[name] = aligned.select(idx)
        return out

    def cancel(self, dataset: str) -> None:
        """Forget the candidates and open sessions of ``dataset`` (the held data stays as it was)."""
        self._candidates.pop(dataset, None)
        for session in [s for s, (d, _, _) in self._sessions.items() if d == dataset]:
            del self._sessions[session]
