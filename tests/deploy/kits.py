"""Helpers for the deployment tests: a federation file on 127.0.0.1, and starting a party from its kit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STARTUP_TIMEOUT = 60.0  # a guard against a hung start (2 busy shared cores), not a test of speed


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def federation_text(
    parties: dict[str, str], researchers=("dr-lee",), *, metrics: bool = False, policy: str = ""
) -> str:
    """A provisioning file: ``parties`` (name -> role) on 127.0.0.1 at free ports."""
    ports = free_ports(2 * len(parties))
    out = ['[federation]\nname = "test-federation"\ndays = 2\n']
    for i, (name, role) in enumerate(parties.items()):
        out.append(
            f'[[party]]\nname = "{name}"\nhost = "127.0.0.1"\nlisten = "127.0.0.1"\nport = {ports[2 * i]}\n'
            f'role = "{role}"\n' + (f"metrics_port = {ports[2 * i + 1]}\n" if metrics else "")
        )
        if policy and role != "compute":
            out.append(f"[party.policy]\n{policy}\n")
    out += [f'[[researcher]]\nname = "{r}"\n' for r in researchers]
    return "\n".join(out)


@dataclass
class KitWorker:
    name: str
    proc: subprocess.Popen
    address: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_kit(kit: Path, *extra: str, wait: bool = True) -> KitWorker:
    """Run ``kit/start.sh`` (its own worker.toml, in its own directory and process), one torch thread."""
    addr = kit / "address"
    addr.unlink(missing_ok=True)
    log = kit / "worker.log"
    env = {**os.environ, "SPLITNN": f"{sys.executable} -m splitnn", "OMP_NUM_THREADS": "1"}
    args = [str(kit / "start.sh"), "--threads", "1", "--max-lifetime", "600", "--address-file", str(addr), *extra]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    worker = KitWorker(kit.name, proc, "", log)
    if not wait:
        return worker
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not addr.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            worker.stop()
            raise RuntimeError(f"party {kit.name} did not start:\n{log.read_text()}")
        time.sleep(0.05)
    worker.address = addr.read_text().strip()
    return worker
