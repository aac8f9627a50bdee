"""A worker's audit log: what ran on this party's data and what left it, one JSON object per line.

:class:`AuditLog` writes it (its docstring lists the events and their fields); :func:`read_audit` reads it.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
from pathlib import Path
from typing import IO, Any

__all__ = ["AuditLog"]


class AuditLog:
    """Appends audit events to a JSON-lines file.

    The operator of a party reads it to answer "what did the researchers do here?". Every line is
    one event with ``time`` (UTC, ISO 8601), ``event``, ``worker`` and, for a networked worker,
    ``session`` (the session's public tag, never its secret id), plus the event's own fields:

    * ``policy`` -- the policy in force when the worker started (its non-default rules);
    * ``segment`` -- a segment installed: ``segment`` (key), ``fingerprint``, ``params``;
    * ``dataset_read`` -- a model first read one of this party's datasets: ``dataset``, ``part``
      (``features``/``labels``), ``segment``;
    * ``refusal`` -- a policy refusal: ``rule``, ``what``, ``message``;
    * ``sent`` -- bytes this party sent, per receiver and kind since the last ``sent`` line of the
      session: ``to``, ``kind``, ``bytes``, ``count``;
    * ``checkpoint`` -- a checkpoint written: ``job`` (a tag of the job id), ``step``, ``bytes``;
    * ``restore`` -- a checkpoint loaded: ``job``, ``step``;
    * ``session_end`` -- a session ended (networked workers).

    Lines are appended and flushed one at a time (a crash loses at most the line being written),
    from any thread. The file is opened in append mode, so a restarted worker continues it.

    Args:
        path: the log file (created if missing, appended to otherwise).
        worker: the party's name, written on every line.
    """

    def __init__(self, path: str | os.PathLike, worker: str) -> None:
        self.path = Path(path)
        self.worker = worker
        self._lock = threading.Lock()
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def write(self, event: str, *, session: str | None = None, **fields: Any) -> None:
        """Append one event (``fields`` must be JSON values)."""
        record: dict[str, Any] = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "event": event,
            "worker": self.worker,
        }
        if session is not None:
            record["session"] = session
        record.update(fields)
        line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            if self._file is None:
                return
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r})"


def read_audit(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every event of an audit log, in order (a helper for tests and tools)."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
