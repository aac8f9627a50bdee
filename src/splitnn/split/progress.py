"""How ``fit`` shows that it is working: a progress bar where one renders, plain lines elsewhere.

``progress`` (an argument of :func:`~splitnn.split.fit.fit`) picks one of three modes:

* a bar per epoch (``tqdm.auto``: a terminal's text bar, a notebook's widget) -- for ``True`` or
  ``None`` (the default) when stderr is a terminal or the code runs in a Jupyter kernel;
* plain lines on stderr, never a ``\\r`` frame -- for ``True``/``None`` when stderr is not a
  terminal (output redirected to a file or a pipe), and for ``"lines"``: a heartbeat line
  (``epoch 2/5: batch 300/938, loss 0.4123, 31 s``) at most every :data:`HEARTBEAT_SECONDS`
  during an epoch, and a line when an epoch ends unless the caller reports epochs itself
  (``on_epoch``);
* nothing -- for ``False``.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

from splitnn.errors import ConfigurationError

__all__ = ["HEARTBEAT_SECONDS", "EpochProgress", "progress_mode"]

#: The most seconds between two heartbeat lines of an epoch (plain-lines mode).
HEARTBEAT_SECONDS = 30.0


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (whose stderr is no terminal, yet shows a widget bar)."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - ipykernel always brings IPython
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def _interactive(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty()) or _in_notebook()


def progress_mode(progress: object, stream: TextIO | None = None) -> str:
    """``"bar"``, ``"lines"`` or ``"off"`` for a ``progress`` argument (see the module docstring)."""
    if progress is False:
        return "off"
    if progress == "lines":
        return "lines"
    if progress is None or progress is True:
        return "bar" if _interactive(stream if stream is not None else sys.stderr) else "lines"
    raise ConfigurationError(f'progress must be True, False, None (automatic) or "lines", got {progress!r}')


class EpochProgress:
    """One epoch's progress in the chosen mode: ``update`` per batch, ``set_postfix(loss=...)``, ``close``."""

    def __init__(
        self, mode: str, *, total: int, initial: int, epoch: int, epochs: int, stream: TextIO | None = None
    ) -> None:
        self.mode, self.total, self.done = mode, total, initial
        self.label = f"epoch {epoch}/{epochs}"
        self.stream = stream if stream is not None else sys.stderr
        self.loss: str | None = None
        self.start = self.last = time.monotonic()
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=self.label,
            unit="batch",
            leave=False,
            disable=mode != "bar",
            mininterval=0.5,
            file=self.stream,
        )

    def set_postfix(self, *, loss: str, refresh: bool = False) -> None:
        self.loss = loss
        self.bar.set_postfix(loss=loss, refresh=refresh)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        if self.mode == "lines" and time.monotonic() - self.last >= HEARTBEAT_SECONDS:
            self.last = time.monotonic()
            self._line(f"batch {self.done}/{self.total}" + (f", loss {self.loss}" if self.loss else ""))

    def close(self) -> None:
        self.bar.close()

    def epoch_line(self, text: str) -> None:
        """The line that closes an epoch (plain-lines mode)."""
        if self.mode == "lines":
            self._line(text)

    def _line(self, text: str) -> None:
        print(f"{self.label}: {text}, {time.monotonic() - self.start:.0f} s", file=self.stream, flush=True)
