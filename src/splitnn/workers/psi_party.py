"""A worker's side of private set intersection (see :mod:`splitnn.training.alignment` for the protocol).

Per dataset, a party keeps its *candidate* rows: at first every row it holds ids for;
each intersection it runs as the client narrows them to the rows whose ids the other
party holds too. Committing (:meth:`PsiParty.apply`) keeps exactly the candidate rows,
ordered by id, so that every party that ends with the same set of ids also ends with
the same row order -- without any id crossing a link in the clear.

Runs. A *run* of a dataset at a party is its exchanges from the first request or reply over it
until it is committed (:meth:`PsiParty.apply`) or abandoned (:meth:`PsiParty.cancel`).
:class:`PsiRuns` counts the runs each dataset took part in, for the ``max_psi_runs`` rule of the
party's policy; a networked worker shares one among all its sessions, so that opening another
session does not start the count afresh.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import torch

from splitnn.data.psi_messages import PsiClient, psi_reply
from splitnn.errors import WorkerError
from splitnn.workers.held import HeldData

#: Client sessions (requests sent, replies not yet read) one party keeps open at once.
MAX_OPEN_PSI_SESSIONS = 16


class PsiRuns:
    """How many PSI runs each dataset took part in (see the module docstring); safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, int] = {}

    def start(self, dataset: str, check: Callable[[int], None]) -> None:
        """Count one more run of ``dataset``, after ``check(runs so far)`` (which raises to refuse it)."""
        with self._lock:
            runs = self._runs.get(dataset, 0)
            check(runs)
            self._runs[dataset] = runs + 1

    def count(self, dataset: str) -> int:
        """The runs ``dataset`` took part in so far."""
        with self._lock:
            return self._runs.get(dataset, 0)


class PsiParty:
    """Candidate rows per dataset, the open runs and the open client sessions of one worker."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self._candidates: dict[str, list[int]] = {}
        self._sessions: dict[str, tuple[str, PsiClient, list[int]]] = {}
        self._open: set[str] = set()  # datasets with a run under way (not yet applied or cancelled)

    def open_run(self, dataset: str, runs: PsiRuns, check: Callable[[int | None], None]) -> None:
        """Let ``dataset`` take part in a run: ``check(runs so far)`` when this starts a new run (then counted in
        ``runs``), ``check(None)`` when one is under way. ``check`` raises to refuse."""
        if dataset in self._open:
            check(None)
            return
        runs.start(dataset, check)
        self._open.add(dataset)

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
        if len(self._sessions) >= MAX_OPEN_PSI_SESSIONS:
            raise WorkerError(
                f"worker {self.worker!r} has {len(self._sessions)} PSI sessions open (requests whose replies it has "
                f"not read), its limit; finish or cancel them first"
            )
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
        wrong = [name for name in parts if not (name.startswith(f"{dataset}:") and len(name) > len(dataset) + 1)]
        if wrong:
            raise WorkerError(
                f"worker {self.worker!r}: a part of dataset {dataset!r} must be named '{dataset}:PART', "
                f"not {wrong[0]!r}"
            )
        positions = self._candidates[dataset]
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
        del self._candidates[dataset]  # (only now: a refused apply leaves the run as it was, to cancel or retry)
        self._open.discard(dataset)
        return out

    def cancel(self, dataset: str) -> None:
        """Forget the candidates, run and open sessions of ``dataset`` (the held data stays as it was)."""
        self._candidates.pop(dataset, None)
        self._open.discard(dataset)
        for session in [s for s, (d, _, _) in self._sessions.items() if d == dataset]:
            del self._sessions[session]
