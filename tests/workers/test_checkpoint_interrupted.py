"""A party killed while writing a checkpoint: the write leaves no file that a resume could take for a checkpoint,
its temporary file is cleaned up, and ``fit(retries=...)`` resumes -- also when the kill hit the job's very first
checkpoint (before it, a fault there ended ``fit`` with nothing to resume from).

Two ways: a real ``splitnn worker`` that SIGKILLs itself half-way through its first checkpoint write, and a
process that dies (``os._exit``) at each step of :func:`save_party_checkpoint` in turn.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

import splitnn
from splitnn.workers.checkpoint import held_steps, job_tag
from tests.client.test_remote_checkpoint import DATA, FIT, chain, connect, in_process_reference, start
from tests.helpers import assert_same_weights
from tests.transport.cluster import Cluster

JOB = "j" * 32


def _temps(root):
    return sorted(p.name for p in root.rglob("*") if ".tmp" in p.name)


@pytest.mark.network
@pytest.mark.timeout(300)
def test_a_worker_killed_during_its_first_checkpoint_is_resumed_by_fit_retries(tmp_path, monkeypatch):
    monkeypatch.setattr("splitnn.split.fit.RETRY_WAIT", 0.2)
    recovered = []
    recover = splitnn.split.fit._recover
    monkeypatch.setattr("splitnn.split.fit._recover", lambda *a, **k: recovered.append(1) or recover(*a, **k))
    build = chain("adam:lr=0.01")
    reference = in_process_reference(build)
    names = ("alice", "bob", "claire")
    dying = ("--data", "die=tests.workers.die_mid_checkpoint:tiny", "--trust", "tests.workers")
    with Cluster(tmp_path, lifetime=250, tcp=False) as cl:
        start(cl, ("alice", "claire"))
        start(cl, ["bob"], *dying)
        bob = cl.workers["bob"]
        workers = connect(cl, names)
        model = build(workers)
        restarted = []
        save = workers[1].save_checkpoint

        def restart_when_dead():  # the operator restarts bob at once, while the researcher's call is still resuming
            assert bob.exited(30) and bob.proc.returncode == -9  # it really died mid-write
            left = _temps(tmp_path / "bob-state")
            assert len(left) == 1 and left[0].startswith(".step-0.safetensors.")  # the orphan temp file
            start(cl, ["bob"], listen=bob.address)  # same --state-dir, without the dying module
            restarted.append(left)

        def save_then_restart(*args, **kwargs):  # bob's first save kills it
            if restarted or watcher:
                return save(*args, **kwargs)
            watcher.append(threading.Thread(target=restart_when_dead, daemon=True))
            watcher[0].start()
            try:
                return save(*args, **kwargs)
            finally:
                watcher[0].join(60)

        watcher: list[threading.Thread] = []
        workers[1].save_checkpoint = save_then_restart
        history = model.fit(DATA, checkpoint_dir=tmp_path / "ck", retries=5, **FIT)
        assert restarted, "bob was not killed in its first checkpoint"
        assert recovered  # fit went back to the last checkpoint (bob's new process knows no session)
        assert len(history.epochs) == FIT["epochs"]
        assert_same_weights(model.collect(), reference)
        assert _temps(tmp_path) == []  # the orphan was cleaned; no write left another
        for w in workers:
            w.close()


DIE_AT = {
    "mid-write": "splitnn.workers.checkpoint.save_file = lambda t, f, metadata=None: "
    "(open(f, 'wb').write(b'xx'), os._exit(9))",
    "before-rename": "splitnn.workers.checkpoint.os.fsync = lambda fd: os._exit(9)",
    "after-rename": "splitnn.workers.checkpoint._fsync_dir = lambda d: os._exit(9)",
}


@pytest.mark.parametrize("where", sorted(DIE_AT))
def test_a_process_dying_at_each_write_step_leaves_nothing_a_resume_misreads(where, tmp_path):
    """The party's checkpoint of step 2 exists; a write of step 4 dies at ``where``. Step 2 stays readable, a half
    file is never listed as a step, and the next write (or load) removes the temporary file."""
    code = textwrap.dedent(
        f"""
        import os, sys, torch
        from torch import nn
        import splitnn.workers.checkpoint
        from splitnn.workers.checkpoint import save_party_checkpoint

        class Seg:
            module = nn.Linear(3, 2)
            optimizer = None
            send_out = send_grad = None

        torch.manual_seed(0)
        seg = Seg()
        save_party_checkpoint(sys.argv[1], {JOB!r}, 2, worker="bob", segments={{"s0": seg}})
        {DIE_AT[where]}
        save_party_checkpoint(sys.argv[1], {JOB!r}, 4, worker="bob", segments={{"s0": seg}})
        """
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    job_dir = tmp_path / job_tag(JOB)
    steps = held_steps(tmp_path, JOB)
    left = _temps(tmp_path)
    if where == "after-rename":  # the rename happened: step 4 is complete, nothing temporary is left
        assert steps == [2, 4] and left == []
    else:
        assert steps == [2] and len(left) == 1  # the half-written file is hidden under its temporary name

    import torch
    from torch import nn

    from splitnn.workers.checkpoint import load_party_checkpoint, save_party_checkpoint

    class Seg:
        module = nn.Linear(3, 2)
        optimizer = None
        send_out = send_grad = None

    load_party_checkpoint(tmp_path, JOB, 2, worker="bob", segments={"s0": Seg()})  # what a resume does
    assert _temps(tmp_path) == []
    (job_dir / ".step-6.safetensors.abcd.tmp.safetensors").write_bytes(b"half")  # another orphan
    save_party_checkpoint(tmp_path, JOB, 6, worker="bob", segments={"s0": Seg()})
    assert _temps(tmp_path) == [] and held_steps(tmp_path, JOB)[-1] == 6
    torch.manual_seed(0)


def test_a_manifest_write_killed_half_way_is_cleaned_when_the_job_resumes(tmp_path):
    torch_model = chain("sgd:lr=0.05")([splitnn.VirtualWorker(n) for n in ("alice", "bob", "claire")])
    (tmp_path / ".manifest.json.x1y2.tmp.json").write_text('{"format": "splitnn-man')
    torch_model.fit(DATA, checkpoint_dir=tmp_path, resume=True, epochs=1, batch_size=64, seed=3, progress=False)
    assert (tmp_path / "manifest.json").is_file() and _temps(tmp_path) == []
