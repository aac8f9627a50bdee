"""Start ``splitnn worker`` processes on 127.0.0.1 for tests and benchmarks, and always stop them.

Each worker runs ``python -m splitnn worker`` with the caller's torch thread count
(``torch.get_num_threads()`` when it starts, or ``threads``), so that a run over the workers
computes with the same kernels' reductions as the same run in the caller's process and ends
with the same weights bit for bit; an address file (so the caller learns the port it bound)
and a maximum lifetime (so a crashed test leaves no process behind for long).
``env`` adds environment variables for the workers only, e.g.
``PYTHONPATH`` to run them from another source tree in an A/B benchmark. With ``tcp`` (by
default when ``SPLITNN_DATA_PLANE=tcp``, which runs a test suite's networked tests over it) every
worker also listens for peer links on a TCP data plane (``--data-listen``). A worker started with
``--data`` and no ``--policy`` gets an explicit opening of its gate (:data:`OPEN_POLICY`) unless
``open_data=False``: a data holder is closed by default (docs/security.md).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from splitnn.transport.addresses import join_host_port, split_host_port

STARTUP_TIMEOUT = 60.0  # seconds to wait for a worker to print its address (2 busy shared cores)


def _caller_threads() -> int:
    import torch  # only when a worker starts: the launcher itself needs no torch

    return torch.get_num_threads()


@dataclass
class WorkerProcess:
    name: str
    proc: subprocess.Popen
    address: str
    log: Path

    @property
    def url(self) -> str:
        return f"grpc://{self.address}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exited(self, timeout: float = 30.0) -> bool:
        """Wait (up to ``timeout`` s, a guard against hangs) for the process to end; whether it has.

        A signalled process is not gone the instant ``kill`` returns: poll its state instead of
        asserting on it at once.
        """
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def rss_bytes(self, field: str = "VmRSS") -> int:
        """The worker's resident memory now (``VmHWM``: its peak so far); Linux: /proc/PID/status."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} for worker {self.name}")


def open_files_prefix(soft: int, hard: int | None = None) -> list[str]:
    """A command prefix that sets the open-files limit (soft, and hard if given) and execs the rest.

    (Not ``preexec_fn``: running Python in a child forked from a process with gRPC's threads can
    deadlock before ``exec``.)
    """
    code = (
        "import os, resource, sys; h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard if hard is not None else 'h'})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", code]


#: The explicit opening of a data holder's gate (splitnn.workers.policy): weights and gradient norms may leave, any
#: segment runs on its data, and the researcher names the rows -- the behaviour of an in-process worker.
OPEN_POLICY = (
    "release_weights = true\naccept_any_segment = true\nmin_batch_size = 1\ndraw_rows = false\n"
    "release_grad_norms = true\n"
)


@dataclass
class Cluster:
    """Worker processes sharing one token; use as a context manager (stops them all on exit)."""

    root: Path
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    workers: dict[str, WorkerProcess] = field(default_factory=dict)
    lifetime: float = 300.0
    env: dict[str, str] = field(default_factory=dict)
    #: give every worker a TCP data plane (``--data-listen``); by default when ``SPLITNN_DATA_PLANE=tcp``
    tcp: bool = field(default_factory=lambda: os.environ.get("SPLITNN_DATA_PLANE") == "tcp")
    #: a worker started with ``--data`` and no ``--policy`` gets :data:`OPEN_POLICY` (tests that train on it
    #: and collect its weights); False: the worker's own, closed default
    open_data: bool = True
    #: torch intra-op threads of every worker (``--threads``); None: the caller's ``torch.get_num_threads()``
    threads: int | None = None

    def __post_init__(self) -> None:
        self._data_ports: dict[str, int] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self.token_file = self.root / "TOKEN"
        self.token_file.write_text(self.token + "\n")

    def start(
        self,
        name: str,
        *args: str,
        token_file: Path | None = None,
        listen: str = "127.0.0.1:0",
        prefix: Sequence[str] = (),
    ) -> WorkerProcess:
        """Start worker ``name`` and wait for its address file. ``listen`` is its ``--listen``;
        ``prefix`` goes before the command line (e.g. ``ip netns exec NS`` or :func:`open_files_prefix`,
        which exec, so the process started is still the worker itself)."""
        return self._wait(*self._launch(name, args, token_file, listen, prefix))

    def start_many(self, names: Sequence[str], *args: str, **kwargs) -> list[WorkerProcess]:
        """Start workers ``names`` (each with ``args`` and ``kwargs`` as :meth:`start` takes them) all at once,
        then wait for each: their start-ups (importing torch, mostly) overlap."""
        opts = {"token_file": None, "listen": "127.0.0.1:0", "prefix": ()}
        if set(kwargs) - set(opts):
            raise TypeError(f"start_many() got unexpected keyword arguments {sorted(set(kwargs) - set(opts))}")
        opts.update(kwargs)
        launched = [self._launch(name, args, opts["token_file"], opts["listen"], opts["prefix"]) for name in names]
        try:
            return [self._wait(*each) for each in launched]
        except BaseException:
            for _, proc, _, _ in launched:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
            raise

    def _launch(
        self, name: str, args: Sequence[str], token_file: Path | None, listen: str, prefix: Sequence[str]
    ) -> tuple[str, subprocess.Popen, Path, Path]:
        """Start worker ``name``'s process; its name, process, address file and log."""
        if "--data" in args and "--policy" not in args and self.open_data:
            args = (*args, "--policy", str(self._open_policy()))
        addr_file = self.root / f"{name}.addr"
        addr_file.unlink(missing_ok=True)
        log = self.root / f"{name}.log"
        threads = str(self.threads if self.threads is not None else _caller_threads())
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **self.env}
        cmd = [
            *prefix,
            sys.executable,
            "-m",
            "splitnn",
            "worker",
            "--name",
            name,
            "--listen",
            listen,
            "--token-file",
            str(token_file or self.token_file),
            "--address-file",
            str(addr_file),
            "--threads",
            threads,
            "--max-lifetime",
            str(self.lifetime),
            *(("--data-listen", self.data_listen(name, listen)) if self.tcp else ()),
            *args,
        ]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return name, proc, addr_file, log

    def _wait(self, name: str, proc: subprocess.Popen, addr_file: Path, log: Path) -> WorkerProcess:
        """Wait for a started worker's address file (RuntimeError with its log if it exits or never writes one)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not addr_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait(5)
                raise RuntimeError(f"worker {name} did not start:\n{log.read_text()}")
            time.sleep(0.05)
        wp = WorkerProcess(name, proc, addr_file.read_text().strip(), log)
        self.workers[name] = wp
        return wp

    def _open_policy(self) -> Path:
        """A policy file that opens a data holder's gate (:data:`OPEN_POLICY`)."""
        path = self.root / "open-policy.toml"
        path.write_text(OPEN_POLICY)
        return path

    def data_listen(self, name: str, listen: str = "127.0.0.1:0") -> str:
        """A ``--data-listen`` address for worker ``name`` (on the host of its ``listen``): a port of its own, the
        same when it is restarted (as an operator would restart it: on the same ports)."""
        host = split_host_port(listen, "--listen", any_port=True)[0]
        if name not in self._data_ports:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
                try:
                    sock.bind((host, 0))
                except OSError:  # not an address of this namespace (the worker runs in another): any port there
                    return join_host_port(host, 0)
                self._data_ports[name] = sock.getsockname()[1]
        return join_host_port(host, self._data_ports[name])

    def connect(self, *names: str, timeout: float = 60.0) -> list:
        """A researcher's :func:`splitnn.connect` to each named worker, in order (close them when done)."""
        from splitnn.client import connect  # the client (grpc) only when a test connects

        return [connect(self.workers[n].url, token=self.token, name=n, timeout=timeout) for n in names]

    def stop(self, name: str, sig: int = signal.SIGTERM, wait: float = 10.0) -> int | None:
        wp = self.workers[name]
        if wp.proc.poll() is None:
            wp.proc.send_signal(sig)
            try:
                wp.proc.wait(wait)
            except subprocess.TimeoutExpired:
                wp.proc.kill()
                wp.proc.wait(5)
        return wp.proc.returncode

    def stop_all(self) -> None:
        """SIGTERM every worker at once, then wait (graceful shutdowns overlap); kill stragglers."""
        for wp in self.workers.values():
            if wp.proc.poll() is None:
                wp.proc.send_signal(signal.SIGCONT)  # in case a test stopped it
                wp.proc.terminate()
        for wp in self.workers.values():
            try:
                wp.proc.wait(10)
            except subprocess.TimeoutExpired:
                wp.proc.kill()
                wp.proc.wait(5)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
