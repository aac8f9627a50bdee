"""A worker's health, for its operators: ``splitnn status`` asks for it with the ``health`` command.

What it tells a caller who holds the federation token (and, with mutual TLS, a federation
certificate): the splitnn version, uptime, device, how many researchers' sessions are open, when the
worker's certificate expires, and the last command that failed (its operation, error type and time;
never the message, which may name another session's segments or data). Nothing about any session's
content.

:data:`COMMAND_OBSERVERS` is the one hook the executor calls after every command (the worker's
name, the operation, its duration in seconds, and the exception or None): the health's last
error and the Prometheus metrics (:mod:`splitnn.server.metrics`) listen there.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable

log = logging.getLogger("splitnn.worker")

#: Called as ``observe(worker, op, seconds, exc_or_None)`` after every command a worker of this process runs.
COMMAND_OBSERVERS: list[Callable[[str, str, float, BaseException | None], None]] = []


def command_done(worker: str, op: str, seconds: float, exc: BaseException | None) -> None:
    """Tell the observers that ``worker`` ran ``op`` (the executor's one call)."""
    for observe in COMMAND_OBSERVERS:
        observe(worker, op, seconds, exc)


class Health:
    """One worker's health record (see the module docstring)."""

    def __init__(self, name: str, device: str, cert: str | None = None) -> None:
        from splitnn import __version__

        self.name, self.device, self.version = name, device, __version__
        self.started = time.monotonic()
        self.cert_expiry: datetime.datetime | None = None
        self.cert_warning: str | None = None
        self.last_error: dict | None = None
        if cert is not None:
            self._read_certificate(cert)
        COMMAND_OBSERVERS.append(self._observe)

    def _read_certificate(self, cert: str) -> None:
        from splitnn.errors import ConfigurationError
        from splitnn.transport.certificates import certificate_info, expiry_warning

        try:
            info = certificate_info(cert)
        except ConfigurationError as exc:  # e.g. no `cryptography`: the expiry stays unknown
            log.info("worker %s: cannot read its certificate's expiry: %s", self.name, exc)
            return
        self.cert_expiry = info.not_after
        self.cert_warning = expiry_warning(info)
        if self.cert_warning:
            log.warning("worker %s: %s", self.name, self.cert_warning)

    def _observe(self, worker: str, op: str, seconds: float, exc: BaseException | None) -> None:
        if exc is not None and worker == self.name:
            now = datetime.datetime.now(datetime.timezone.utc)
            self.last_error = {"op": op[:64], "type": type(exc).__name__, "at": now.isoformat(timespec="seconds")}

    def close(self) -> None:
        """Stop listening to commands (the worker stopped)."""
        if self._observe in COMMAND_OBSERVERS:
            COMMAND_OBSERVERS.remove(self._observe)

    def result(self, open_sessions: int) -> dict:
        """The ``health`` command's result."""
        out = {
            "name": self.name,
            "version": self.version,
            "uptime": round(time.monotonic() - self.started, 3),
            "device": self.device,
            "sessions": open_sessions,
            "cert_expiry": self.cert_expiry.isoformat(timespec="seconds") if self.cert_expiry else None,
            "last_error": self.last_error,
        }
        if self.cert_warning:
            out["warning"] = self.cert_warning
        return out


def open_sessions(sessions) -> int:
    """Researchers' sessions with a stream open now (the probe asking is anonymous: not counted)."""
    kept = getattr(sessions, "_by_id", {})
    return sum(1 for s in kept.values() if not s.anonymous and s.streams > 0)
