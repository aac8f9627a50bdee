"""Worker processes a :class:`~splitnn.testing.cluster.Cluster` starts compute with the caller's torch thread count
(so a run over them is bit-identical to the same run in the caller's process), or the count it is given."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitnn.testing.cluster import Cluster

pytestmark = pytest.mark.network


def _threads_of(pid: int) -> tuple[str, str]:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    env = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
    return argv[argv.index(b"--threads") + 1].decode(), env[b"OMP_NUM_THREADS"].decode()


@pytest.mark.parametrize("threads", [None, 2], ids=["the-callers", "given"])
def test_workers_get_the_callers_thread_count(threads, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what tests and CI set: the worker must not just inherit it
    torch.set_num_threads(3)
    try:
        with Cluster(tmp_path, threads=threads) as cl:
            bob = cl.start("bob")
            expected = "3" if threads is None else "2"
            assert _threads_of(bob.proc.pid) == (expected, expected)
    finally:
        torch.set_num_threads(1)
