"""Python lines a ``splitnn worker`` executes, per function, for ``bench_lines.py``.

On a worker's ``PYTHONPATH`` with ``SPLITNN_LINE_COUNTS=DIR`` set, this installs two signal handlers:
``SIGUSR1`` starts counting the line events of every Python frame the worker's main thread (its event loop)
enters from then on (``sys.settrace``), ``SIGUSR2`` stops and writes ``DIR/<party>.json``: one row
``[file, qualified name, first line, lines]`` per function. A count of lines run is the same on a quiet machine
and a busy one, so two trees compare without timing noise. Benchmark-only: the library never imports it.
"""

from __future__ import annotations

import json
import os
import signal
import sys

OUT = os.environ.get("SPLITNN_LINE_COUNTS")


def _install(out: str) -> None:
    from line_counter import LineCounter  # (this file's directory is on the worker's path)

    counter = LineCounter()

    def start(signum, frame) -> None:
        counter.start()

    def stop(signum, frame) -> None:
        rows = counter.stop()
        name = sys.argv[sys.argv.index("--name") + 1] if "--name" in sys.argv else str(os.getpid())
        tmp = os.path.join(out, f"{name}.json.tmp")
        with open(tmp, "w") as fh:
            json.dump(rows, fh)
        os.replace(tmp, os.path.join(out, f"{name}.json"))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


if OUT and "worker" in sys.argv:
    _install(OUT)
