"""``examples/vertical_health.py``: its help, and its ``--processes`` comparison in the default environment.

tests/conftest.py runs every test with one torch thread and CI sets ``OMP_NUM_THREADS=1``; a
reader's shell sets neither. The example runs here as a reader runs it -- a subprocess without
``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` -- and its run over worker processes must still end
with the in-process run's weights (the worker processes compute with the example's thread count).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vertical_health.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return subprocess.run([sys.executable, str(EXAMPLE), *args], env=env, capture_output=True, text=True, timeout=600)


def test_help_describes_epochs_and_lr():
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "--epochs EPOCHS passes over the training set (default 20)" in text
    assert "--lr LR Adam learning rate of every party (default 0.003)" in text


@pytest.mark.network
@pytest.mark.slow
def test_processes_equal_the_in_process_run_without_a_thread_setting():
    done = _run("--seeds", "1", "--epochs", "2", "--processes")
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "over worker processes: the same intersection, metrics, ledger and weights (torch.equal)" in done.stdout
