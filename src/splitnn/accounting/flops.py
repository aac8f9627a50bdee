"""Compute accounting: floating-point operations and wall time per worker.

:class:`ComputeMeter` wraps workers (:class:`MeteredWorker`) and counts, per worker and phase, the
FLOPs of PyTorch's own counter and the wall time of each call; its docstring says what is counted
and how to use it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from torch.utils.flop_counter import FlopCounterMode

__all__ = ["ComputeMeter", "ComputeStats", "MeteredWorker", "unwrap", "FLOP_PHASES", "TIMED_CALLS"]

#: Worker calls whose FLOPs are counted, and the phase they are charged to.
FLOP_PHASES: Mapping[str, str] = {"forward": "forward", "loss": "forward", "backward": "backward", "step": "other"}

#: Worker calls whose wall time is measured (the FLOP-counted ones and the transfers).
TIMED_CALLS = frozenset(
    {
        *FLOP_PHASES,
        "zero_grad",
        "put",
        "fetch",
        "get_state",
        "set_state",
        "send_state",
        "average_states",
        "get_grads",
        "fetch_segment",
    }
)


@dataclass
class ComputeStats:
    """What one party computed: FLOPs by phase, seconds spent in its calls, number of calls."""

    forward_flops: int = 0
    backward_flops: int = 0
    other_flops: int = 0
    seconds: float = 0.0
    calls: int = 0

    @property
    def flops(self) -> int:
        """All counted FLOPs (forward + backward + other)."""
        return self.forward_flops + self.backward_flops + self.other_flops

    def to_dict(self) -> dict[str, float]:
        """The fields and the total, for JSON reports."""
        return {**asdict(self), "flops": self.flops}


class ComputeMeter:
    """FLOPs and wall time per party.

    FLOPs are counted by PyTorch's own counter, :class:`torch.utils.flop_counter.FlopCounterMode`,
    around each call a worker serves, and attributed to that worker by phase:

    * ``forward``: :meth:`forward` and :meth:`loss` calls;
    * ``backward``: :meth:`backward` calls;
    * ``other``: :meth:`step` (optimizer) calls.

    PyTorch's counter counts the matrix products and convolutions (``mm``, ``addmm``,
    ``bmm``, ``convolution`` and their backward kernels, attention), not element-wise
    operations such as ReLU, pooling or an SGD update, which are a small share of a
    network's arithmetic. Wall time is measured for every call that computes or moves
    tensors (see :data:`TIMED_CALLS`), so it includes the counter's own overhead.

    Use it by wrapping workers, not by changing them::

        meter = ComputeMeter()
        alice = meter.wrap(VirtualWorker("alice", fuse=False))
        ...  # train with alice as with any worker
        meter.stats("alice").flops, meter.stats("alice").seconds

    Attribution needs each worker's back-propagation to run inside its own call:
    use ``VirtualWorker(fuse=False)``. With ``fuse=True`` (the default) one autograd
    call from the loss runs the backward of *every* in-process segment inside the
    label holder's :meth:`backward`, so the label holder would be charged for its
    peers' backward FLOPs.

    This module sits in the accounting layer and does not import the workers: the
    wrapper forwards any attribute to the worker it wraps.

    Args:
        count_flops: count FLOPs (with PyTorch's counter); ``False`` measures time only.
    """

    def __init__(self, *, count_flops: bool = True) -> None:
        self.count_flops = count_flops
        self._stats: dict[str, ComputeStats] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def wrap(self, worker: Any) -> MeteredWorker:
        """A worker that behaves as ``worker`` and charges its calls to ``worker.name`` here."""
        if isinstance(worker, MeteredWorker):
            worker = worker.inner
        with self._lock:
            self._stats.setdefault(worker.name, ComputeStats())
        return MeteredWorker(worker, self)

    @contextmanager
    def measure(self, party: str, phase: str | None) -> Iterator[None]:
        """Charge the time (and, when ``phase`` is given, the FLOPs) of the block to ``party``.

        A measurement nested in another one on the same thread is charged to the
        outer one only, so nothing is counted twice.
        """
        if getattr(self._local, "active", False):
            yield
            return
        self._local.active = True
        counter = FlopCounterMode(display=False) if (phase is not None and self.count_flops) else None
        start = time.perf_counter()
        try:
            if counter is None:
                yield
            else:
                with counter:
                    yield
        finally:
            seconds = time.perf_counter() - start
            self._local.active = False
            flops = counter.get_total_flops() if counter is not None else 0
            with self._lock:
                stats = self._stats.setdefault(party, ComputeStats())
                stats.seconds += seconds
                stats.calls += 1
                if phase == "forward":
                    stats.forward_flops += flops
                elif phase == "backward":
                    stats.backward_flops += flops
                elif phase is not None:
                    stats.other_flops += flops

    def stats(self, party: str) -> ComputeStats:
        """A copy of the totals of ``party`` (zeros if it did nothing)."""
        with self._lock:
            return ComputeStats(**asdict(self._stats.get(party, ComputeStats())))

    def per_party(self) -> dict[str, ComputeStats]:
        """Copies of every party's totals, by name."""
        with self._lock:
            names = sorted(self._stats)
        return {name: self.stats(name) for name in names}

    def reset(self) -> None:
        """Set every party's totals back to zero."""
        with self._lock:
            for name in self._stats:
                self._stats[name] = ComputeStats()

    def format_table(self) -> str:
        """A plain-text table: party, forward / backward / other FLOPs, seconds."""
        rows = [("party", "forward FLOPs", "backward FLOPs", "other FLOPs", "seconds")]
        rows += [
            (n, f"{s.forward_flops:,}", f"{s.backward_flops:,}", f"{s.other_flops:,}", f"{s.seconds:.3f}")
            for n, s in self.per_party().items()
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
        )


class MeteredWorker:
    """A worker whose calls are measured by a :class:`ComputeMeter`; everything else is the wrapped worker's.

    It satisfies the same protocol as the worker it wraps (attributes are
    forwarded), so models, baselines and loops take it in place of the worker.
    Peers given to :meth:`connect_peers` are unwrapped, so in-process workers
    still reach each other directly.
    """

    def __init__(self, inner: Any, meter: ComputeMeter) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "meter", meter)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def ledger(self) -> Any:
        return self.inner.ledger

    @ledger.setter
    def ledger(self, value: Any) -> None:
        self.inner.ledger = value

    def connect_peers(self, peers: Mapping[str, Any]) -> None:
        """Let the wrapped worker reach ``peers`` (unwrapped) by name."""
        self.inner.connect_peers({n: unwrap(w) for n, w in peers.items()})

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self.inner, attr)
        if attr not in TIMED_CALLS or not callable(value):
            return value
        return _measured(value, self.meter, self.inner.name, FLOP_PHASES.get(attr))

    def __setattr__(self, attr: str, value: Any) -> None:
        if attr == "ledger":
            object.__setattr__(self, attr, value)  # the property
        else:
            setattr(self.inner, attr, value)

    def __repr__(self) -> str:
        return f"MeteredWorker({self.inner!r})"


def _measured(fn: Callable[..., Any], meter: ComputeMeter, party: str, phase: str | None) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        with meter.measure(party, phase):
            return fn(*args, **kwargs)

    call.__name__ = getattr(fn, "__name__", "call")
    call.__doc__ = getattr(fn, "__doc__", None)
    return call


def unwrap(worker: Any) -> Any:
    """The worker inside a :class:`MeteredWorker` (any other object is returned as it is)."""
    return worker.inner if isinstance(worker, MeteredWorker) else worker
