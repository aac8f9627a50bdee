"""Running several data holders' steps at once: one thread per holder, the shared parties one at a time.

:func:`run_lanes` runs each holder's jobs on a thread of its own (its docstring says why and how);
:class:`Turnstile` lets one job at a time into the shared parties; :class:`Aborted` stops the others
when one fails.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

#: One job: its position in the round (0-based, unique across the lanes) and what it runs.
Job = tuple[int, Callable[[], T]]


class Aborted(Exception):
    """Another lane failed; this one stopped without finishing its job."""


class Turnstile:
    """One job at a time; with ``ordered``, in the order of their tickets ``0, 1, 2, ...``."""

    def __init__(self, *, ordered: bool) -> None:
        self.ordered = ordered
        self._cond = threading.Condition()
        self._next = 0
        self._busy = False
        self._closed = False

    @contextmanager
    def serve(self, ticket: int) -> Iterator[None]:
        """Enter when it is ``ticket``'s turn (any turn when not ``ordered``) and the last job has left."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or (not self._busy and (not self.ordered or self._next == ticket)))
            if self._closed:
                raise Aborted("another data holder's step failed")
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._next += 1
                self._cond.notify_all()

    def close(self) -> None:
        """Stop every job waiting to enter, and every later one."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def run_lanes(
    pool: ThreadPoolExecutor,
    lanes: Sequence[Sequence[Job]],
    turnstile: Turnstile,
    deliver: Callable[[int, T], None],
) -> None:
    """Run every lane on ``pool`` (one thread each), calling ``deliver(position, result)`` here in position order.

    Returns when every lane has finished; raises the first failure (after every lane stopped).

    A *lane* is one data holder's list of jobs (its training steps of a round), run in
    order on a thread of its own; lanes run concurrently. The parties every holder needs
    (the label holder and any other top worker) are entered through a :class:`Turnstile`,
    which lets one job at a time through, and, when ``ordered``, in the order of the jobs'
    positions (0, 1, 2, ... across all lanes), so that a shared segment sees its batches in
    a fixed order whatever the threads' timing. Results are handed to ``deliver`` on the
    calling thread, in position order, as they become available.

    Why threads pay in-process: PyTorch releases the GIL inside its kernels, so one holder's
    forward or backward runs while another holder's Python code (or the label holder's)
    runs. Why the shared parties are entered one at a time: an in-process
    :class:`~splitnn.workers.VirtualWorker` keeps per-call state (its tensor store, its pending
    loss) that is not safe to share between threads. A holder's own worker is only ever
    called from its lane's thread. The only other cross-thread touch is a worker taking a
    tensor from a peer's store (a single ``dict.pop`` of its own key, atomic under the GIL).

    If a job fails, the turnstile is closed: jobs waiting at it (or arriving later) stop
    with :class:`Aborted`, every lane ends, and the first real error is raised on the
    calling thread.
    """
    total = sum(len(lane) for lane in lanes)
    results: dict[int, T] = {}
    errors: list[BaseException] = []
    cond = threading.Condition()

    def run(lane: Sequence[Job]) -> None:
        try:
            for position, job in lane:
                result = job()
                with cond:
                    results[position] = result
                    cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread below
            with cond:
                errors.append(exc)
                cond.notify_all()
            turnstile.close()

    futures = [pool.submit(run, lane) for lane in lanes if lane]
    try:
        for position in range(total):
            with cond:
                cond.wait_for(lambda p=position: p in results or bool(errors))
                if position not in results:
                    break
                result = results.pop(position)
            deliver(position, result)
    except BaseException:
        turnstile.close()  # e.g. deliver failed: stop the lanes before leaving
        for f in futures:
            f.exception()
        raise
    for f in futures:
        f.exception()  # wait for every lane (they never raise: errors are collected)
    real = [e for e in errors if not isinstance(e, Aborted)]
    if real or errors:
        raise (real or errors)[0]
