"""A worker's Prometheus metrics (``splitnn worker --metrics-listen HOST:PORT``; off by default).

:func:`start_metrics` serves them over plain HTTP; :class:`WorkerMetrics` lists them and says what
feeds them.
"""

from __future__ import annotations

from splitnn.accounting import ledger as _ledger
from splitnn.errors import ConfigurationError
from splitnn.server.health import COMMAND_OBSERVERS, open_sessions
from splitnn.transport import counters as _counters
from splitnn.transport.addresses import split_host_port

#: Bucket bounds of the command-duration histogram, in seconds (0.5 ms .. 60 s).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_REFUSALS = ("rejected", "invalid")


class WorkerMetrics:
    """The metrics of one worker, in a registry of their own, fed by the hooks.

    Served over plain HTTP by `prometheus_client <https://prometheus.github.io/client_python/>`_ (the
    ``deploy`` extra) at ``http://HOST:PORT/metrics``; bind it to 127.0.0.1 or a monitoring network,
    not the internet. One worker per process, so the metrics are the process's:

    * ``splitnn_sessions`` -- sessions kept (open, or closed within their grace period);
      ``splitnn_sessions_open`` -- those with a researcher's stream open now;
    * ``splitnn_commands_total{op}`` -- commands run (``forward``, ``backward``, ``step``, ...; a
      coalesced batch of commands counts each), ``splitnn_command_seconds{op}`` -- a histogram of their
      durations (the step latency);
    * ``splitnn_batches_total`` -- coalesced command batches served (one per training step of the
      researcher's fast path);
    * ``splitnn_errors_total{op,reason}`` -- failed commands by error type (``PolicyError``: a refusal);
      ``splitnn_refusals_total{reason}`` -- calls refused before any command ran (``rejected``: a wrong
      token or certificate; ``invalid``: a malformed message);
    * ``splitnn_wire_bytes_total{peer,direction,kind}`` -- serialized bytes sent to / received from each
      peer (:class:`~splitnn.transport.ByteCounters`);
    * ``splitnn_ledger_bytes_total{src,dst,kind}`` and ``splitnn_ledger_transfers_total{src,dst,kind}``
      -- tensor bytes as the ledger records them (:class:`~splitnn.accounting.Ledger`), the numbers the
      researcher's reports show;
    * ``splitnn_certificate_expiry_timestamp_seconds`` -- when this worker's certificate expires;
    * ``process_resident_memory_bytes`` and the rest of the standard process metrics, and
      ``splitnn_cuda_memory_allocated_bytes`` on a CUDA device.

    The counters are fed by the one place each number is recorded: the byte counters and the ledger
    (their ``OBSERVERS`` hooks) and the executor (:data:`splitnn.server.health.COMMAND_OBSERVERS`).
    """

    def __init__(self, server) -> None:
        try:
            from prometheus_client import (
                CollectorRegistry,
                Counter,
                Gauge,
                Histogram,
                PlatformCollector,
                ProcessCollector,
            )
        except ImportError:
            raise ConfigurationError(
                "--metrics-listen needs the 'prometheus_client' package: pip install 'splitnn[deploy]'"
            ) from None
        self.registry = reg = CollectorRegistry()
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        self.name = server.name
        sessions = server.sessions
        Gauge("splitnn_sessions", "sessions kept (open or in grace)", registry=reg).set_function(
            lambda: float(len(sessions))
        )
        Gauge("splitnn_sessions_open", "sessions with a researcher's stream open", registry=reg).set_function(
            lambda: float(open_sessions(sessions))
        )
        self.commands = Counter("splitnn_commands", "commands run", ["op"], registry=reg)
        self.latency = Histogram("splitnn_command_seconds", "command duration", ["op"], buckets=BUCKETS, registry=reg)
        self.batches = Counter("splitnn_batches", "coalesced command batches served", registry=reg)
        self.errors = Counter("splitnn_errors", "failed commands by error type", ["op", "reason"], registry=reg)
        self.refusals = Counter("splitnn_refusals", "calls refused before a command ran", ["reason"], registry=reg)
        self.wire = Counter(
            "splitnn_wire_bytes", "serialized bytes on the wire", ["peer", "direction", "kind"], registry=reg
        )
        self.ledger = Counter(
            "splitnn_ledger_bytes", "tensor bytes in the ledger", ["src", "dst", "kind"], registry=reg
        )
        self.transfers = Counter(
            "splitnn_ledger_transfers", "transfers in the ledger", ["src", "dst", "kind"], registry=reg
        )
        expiry = server.health.cert_expiry
        if expiry is not None:
            Gauge("splitnn_certificate_expiry_timestamp_seconds", "certificate expiry", registry=reg).set(
                expiry.timestamp()
            )
        if str(sessions.device).startswith("cuda"):
            import torch

            device = sessions.device
            Gauge("splitnn_cuda_memory_allocated_bytes", "CUDA memory allocated", registry=reg).set_function(
                lambda: float(torch.cuda.memory_allocated(device))
            )
        self._http = None
        _counters.OBSERVERS.append(self._on_wire)
        _ledger.OBSERVERS.append(self._on_ledger)
        COMMAND_OBSERVERS.append(self._on_command)

    def _on_wire(self, peer: str, direction: str, kind: str, nbytes: int) -> None:
        if kind in _REFUSALS:
            self.refusals.labels(kind).inc()
        self.wire.labels(peer, direction, kind).inc(nbytes)

    def _on_ledger(self, src: str, dst: str, kind: str, nbytes: int) -> None:
        self.ledger.labels(src, dst, kind).inc(nbytes)
        self.transfers.labels(src, dst, kind).inc()

    def _on_command(self, worker: str, op: str, seconds: float, exc: BaseException | None) -> None:
        if worker != self.name:
            return
        self.commands.labels(op).inc()
        self.latency.labels(op).observe(seconds)
        if op == "batch":
            self.batches.inc()
        if exc is not None:
            self.errors.labels(op, type(exc).__name__).inc()

    def serve(self, listen: str) -> str:
        """Serve ``/metrics`` on ``HOST:PORT`` (port 0: a free one); return the bound ``HOST:PORT``."""
        from prometheus_client import start_http_server

        host, port = split_host_port(listen, "--metrics-listen", any_port=True)
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            self.stop()
            raise ConfigurationError(f"--metrics-listen {listen}: cannot listen there: {exc.strerror}") from None
        return f"{host}:{self._http.server_port}"

    def stop(self) -> None:
        for hooks, fn in (
            (_counters.OBSERVERS, self._on_wire),
            (_ledger.OBSERVERS, self._on_ledger),
            (COMMAND_OBSERVERS, self._on_command),
        ):
            if fn in hooks:
                hooks.remove(fn)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def start_metrics(listen: str, server) -> WorkerMetrics:
    """Serve ``server``'s metrics on ``listen`` (``HOST:PORT``); stop them with :meth:`WorkerMetrics.stop`."""
    metrics = WorkerMetrics(server)
    metrics.address = metrics.serve(listen)
    return metrics
