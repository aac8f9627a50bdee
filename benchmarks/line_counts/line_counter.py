"""The line counter of ``sitecustomize.py`` (in the workers) and ``bench_lines.py`` (in the researcher)."""

from __future__ import annotations

import collections
import sys


class LineCounter:
    """Counts the line events of every Python frame this thread enters between :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()

    def _local(self, frame, event, arg):
        if event == "line":
            self.counts[frame.f_code] += 1
        return self._local

    def _enter(self, frame, event, arg):  # a call (or a coroutine resumed): count its lines from here on
        return self._local

    def start(self) -> None:
        self.counts.clear()
        sys.settrace(self._enter)

    def stop(self) -> list[list]:
        """Stop; one row ``[file, qualified name, first line, lines]`` per function."""
        sys.settrace(None)
        return [[c.co_filename, c.co_qualname, c.co_firstlineno, n] for c, n in self.counts.items()]
