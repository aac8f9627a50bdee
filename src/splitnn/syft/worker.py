"""``sy.VirtualWorker``: a named party of the facade, backed by a :class:`splitnn.VirtualWorker`.

A facade worker is a place: tensors and modules sent to it carry it as their
``location``, and every transfer to or from it is recorded in the ledger of the
splitnn worker it wraps (``worker.worker``), which is the hook's ledger. The
wrapped worker is the same party for splitnn's own API: ``splitnn.SplitNN(segments,
[alice.worker, bob.worker])`` trains on those parties and records into the same
ledger.

In-process, like PySyft 0.2's VirtualWorker: nothing is copied or isolated; the
ledger counts the bytes a real transfer would move (dtype size x elements).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from splitnn.accounting import RESEARCHER, Ledger
from splitnn.errors import ConfigurationError
from splitnn.workers import VirtualWorker as _SplitWorker

if TYPE_CHECKING:
    from splitnn.syft.hook import TorchHook


class VirtualWorker:
    """A party that tensors and modules can be sent to, as ``sy.VirtualWorker(hook, id="alice")``.

    Workers are equal when they have the same id (re-running a notebook cell that
    creates ``alice`` again gives a worker equal to the old one).
    """

    def __init__(self, hook: TorchHook, id: str) -> None:  # noqa: A002 - PySyft's argument name
        from splitnn.syft.hook import TorchHook

        if not isinstance(hook, TorchHook):
            raise ConfigurationError(
                f"sy.VirtualWorker needs the hook as first argument "
                f"(hook = sy.TorchHook(torch)), got {type(hook).__name__}"
            )
        if not isinstance(id, str) or not id or id == RESEARCHER:
            raise ConfigurationError(f"worker id must be a non-empty string other than {RESEARCHER!r}, got {id!r}")
        self.hook = hook
        self.id = id
        #: The splitnn party behind this worker; records into the hook's ledger.
        self.worker = _SplitWorker(id, ledger=hook.ledger)

    @property
    def ledger(self) -> Ledger:
        """Where this worker's transfers are recorded (the hook's ledger unless rebound by splitnn)."""
        return self.worker.ledger

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VirtualWorker) and other.id == self.id

    def __hash__(self) -> int:
        return hash(("sy.VirtualWorker", self.id))

    def __repr__(self) -> str:
        return f"<VirtualWorker id:{self.id}>"

    # A worker is a place, not data: copying a module or pointer keeps the same place.
    def __copy__(self) -> VirtualWorker:
        return self

    def __deepcopy__(self, memo: dict) -> VirtualWorker:
        return self


def check_worker(worker: object, method: str) -> VirtualWorker:
    """``worker`` if it is a facade worker, else a :class:`ConfigurationError` naming ``method``."""
    if not isinstance(worker, VirtualWorker):
        raise ConfigurationError(
            f".{method}() needs a sy.VirtualWorker (e.g. sy.VirtualWorker(hook, id='alice')), "
            f"got {type(worker).__name__}"
        )
    return worker


def record(src: VirtualWorker | None, dst: VirtualWorker | None, kind: str, nbytes: int) -> None:
    """Record one transfer; ``None`` is the researcher (the process running the code)."""
    ledger = (dst if dst is not None else src).ledger
    ledger.record(src.id if src is not None else RESEARCHER, dst.id if dst is not None else RESEARCHER, kind, nbytes)
