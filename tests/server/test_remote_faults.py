"""Faults: a worker killed mid-epoch (per-op and shipped epochs), a hung worker, graceful shutdown;
nothing left running."""

from __future__ import annotations

import signal

import pytest
import torch

import splitnn
from splitnn.errors import WorkerError
from splitnn.models import tutorial_mlp
from tests.helpers import toy_dataset
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(180)]
NAMES = ("alice", "bob", "claire")


def _train_until_killed(cl: Cluster, victim: str, sig: int, timeout: float) -> WorkerError:
    """The per-op path: the researcher drives every operation; the victim is signalled at batch 3.

    Set-up (connecting, placing the model and data) waits as long as a busy machine needs; the
    short ``timeout`` under test applies from the first batch on.
    """
    workers = [splitnn.connect(cl.workers[n].url, token=cl.token, name=n, timeout=60) for n in NAMES]
    try:
        torch.manual_seed(0)
        model = splitnn.SplitNN(tutorial_mlp(), workers, ship_epochs=False)
        data, _ = model.prepare(toy_dataset(640))
        for w in workers:
            w.timeout = timeout
        calls = {"n": 0}
        train_batch = model.train_batch

        def killing_train_batch(name, idx):
            calls["n"] += 1
            if calls["n"] == 3:
                cl.workers[victim].proc.send_signal(sig)
            return train_batch(name, idx)

        model.train_batch = killing_train_batch
        with pytest.raises(WorkerError) as info:
            model.fit(data, epochs=1, batch_size=32, progress=False)
        assert calls["n"] < 20, "training went on long after the worker died"
        return info.value
    finally:
        for w in workers:
            w.close()


def test_killed_worker_mid_epoch_fails_fast_naming_it(tmp_path):
    with Cluster(tmp_path, lifetime=120) as cl:
        for n in NAMES:
            cl.start(n, "--peer-timeout", "20")
        err = _train_until_killed(cl, "bob", signal.SIGKILL, timeout=30)
        assert "bob" in str(err)
        assert cl.workers["bob"].exited(timeout=30)  # SIGKILL is delivered asynchronously: wait for it
        # the survivors keep serving: a new model on them connects fine
        alice = splitnn.connect(cl.workers["alice"].url, token=cl.token, timeout=10)
        alice.close()
    assert all(not w.alive() for w in cl.workers.values())


def test_worker_killed_during_a_shipped_epoch_fails_fast_naming_it(tmp_path):
    """The workers run the epoch among themselves; the middle one is killed after 3 batches' losses."""
    with Cluster(tmp_path, lifetime=120) as cl:
        for n in NAMES:
            cl.start(n, "--peer-timeout", "30")  # far above what the test may take: the death must be seen
        workers = [splitnn.connect(cl.workers[n].url, token=cl.token, name=n, timeout=30) for n in NAMES]
        try:
            torch.manual_seed(0)
            model = splitnn.SplitNN(tutorial_mlp(), workers)
            seen = {"n": 0}
            train_epoch = model.train_epoch

            def killing_train_epoch(name, batches, on_batch, **kw):
                def watch(stats):
                    seen["n"] += 1
                    if seen["n"] == 3:
                        cl.workers["bob"].proc.kill()
                    on_batch(stats)

                return train_epoch(name, batches, watch, **kw)

            model.train_epoch = killing_train_epoch
            with pytest.raises(WorkerError, match="bob") as info:
                model.fit(toy_dataset(6400), epochs=1, batch_size=16, progress=False)  # 400 batches
            assert seen["n"] < 400, "the epoch finished although a worker died"
            assert "connection" in str(info.value)
            assert cl.workers["bob"].exited(timeout=30)  # SIGKILL is delivered asynchronously: wait for it
            for n in ("alice", "claire"):  # the survivors noticed and keep serving
                w = splitnn.connect(cl.workers[n].url, token=cl.token, timeout=10)
                w.close()
        finally:
            for w in workers:
                w.close()
    assert all(not w.alive() for w in cl.workers.values())


@pytest.mark.slow
def test_hung_worker_times_out_naming_it(tmp_path):
    with Cluster(tmp_path, lifetime=120) as cl:
        for n in NAMES:
            cl.start(n, "--peer-timeout", "3")
        try:
            err = _train_until_killed(cl, "claire", signal.SIGSTOP, timeout=3)
            assert "claire" in str(err)
        finally:
            cl.workers["claire"].proc.send_signal(signal.SIGCONT)
    assert all(not w.alive() for w in cl.workers.values())


def test_sigterm_and_sigint_shut_down_gracefully(tmp_path):
    with Cluster(tmp_path, lifetime=60) as cl:
        cl.start("alice")
        cl.start("bob")
        assert cl.stop("alice", signal.SIGTERM) == 0
        assert cl.stop("bob", signal.SIGINT) == 0
        assert "stopped" in cl.workers["alice"].log.read_text()
