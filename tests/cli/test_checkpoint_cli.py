"""``splitnn fingerprint`` and ``splitnn train --checkpoint-dir/--resume`` (a real process, a real SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from splitnn.cli.main import main
from splitnn.split.persist import load_model, save_model
from splitnn.wire.fingerprint import fingerprint
from tests.transport.cluster import Cluster


def test_fingerprint_prints_each_recorded_segment(tmp_path, capsys):
    segments = [
        nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU()),
        nn.Sequential(nn.Linear(32, 10), nn.LogSoftmax(1)),
    ]
    path = tmp_path / "m.safetensors"
    save_model(nn.Sequential(*segments[0], *segments[1]), path, segments=[3, 2])
    assert main(["fingerprint", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"0  0-2     {fingerprint(segments[0])}" in out and f"1  3-4     {fingerprint(segments[1])}" in out
    assert f'accept_segments = ["{fingerprint(segments[0])}"]' in out
    assert main(["fingerprint", str(path), "--segments", "1,4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["segments"]
    assert rows[0]["fingerprint"] == fingerprint(nn.Sequential(nn.Flatten()))
    assert main(["fingerprint", str(path), "--segments", "2,2"]) == 2
    assert "adds up to 4 layers, but" in capsys.readouterr().err


def _train(tmp_path, shared_data, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "splitnn", "train", "--dataset", "fashion-mnist"]
    cmd += ["--data-dir", str(shared_data / "fashion-mnist"), "--limit", "2000", "--epochs", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*cmd, *extra], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "networked", [False, pytest.param(True, marks=pytest.mark.network)], ids=["in-process", "networked"]
)
def test_a_killed_researcher_reruns_the_command_with_resume_and_finishes_the_job(tmp_path, shared_data, networked):
    with Cluster(tmp_path / "workers", lifetime=280) as cl:
        where: list[str] = []
        if networked:  # each party keeps its checkpoints in its own --state-dir
            for name in ("alice", "bob", "claire"):
                cl.start(name, "--state-dir", str(tmp_path / f"{name}-state"))
            urls = ",".join(cl.workers[n].url for n in ("alice", "bob", "claire"))
            where = ["--workers", urls, "--token-file", str(cl.token_file)]
        _killed_and_resumed(tmp_path, shared_data, where)
        if networked:
            assert not (tmp_path / "ck" / "parties").exists()
            assert all(list((tmp_path / f"{n}-state").rglob("step-*.safetensors")) for n in ("alice", "bob"))


def _killed_and_resumed(tmp_path, shared_data, where: list[str]) -> None:
    reference = _train(tmp_path, shared_data, *where, "--save", "reference.safetensors")
    assert reference.wait(300) == 0, reference.stdout.read()

    flags = [*where, "--checkpoint-dir", "ck", "--checkpoint-every", "5", "--save", "resumed.safetensors"]
    first = _train(tmp_path, shared_data, *flags)
    manifest = tmp_path / "ck" / "manifest.json"
    deadline = time.monotonic() + 300  # a guard against hangs
    step = 0
    while first.poll() is None and time.monotonic() < deadline:
        if manifest.exists():
            step = json.loads(manifest.read_text())["step"]
            if step >= 10:
                first.send_signal(signal.SIGKILL)  # mid-epoch: 32 batches per epoch
                break
        time.sleep(0.01)
    assert first.wait(30) == -signal.SIGKILL, "the first run ended before it could be killed"
    assert 10 <= json.loads(manifest.read_text())["step"] < 64

    again = _train(tmp_path, shared_data, *flags, "--resume")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "epoch 1/2" in out and "epoch 2/2" in out
    a = load_model(tmp_path / "resumed.safetensors").state_dict()
    b = load_model(tmp_path / "reference.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
