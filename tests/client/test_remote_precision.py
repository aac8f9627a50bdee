"""Mixed precision per party across `splitnn worker` processes: ``splitnn.connect(..., autocast="bf16")`` places
segments that run under bf16 autocast at that worker, as ``VirtualWorker(name, autocast="bf16")`` does in process.
The oracle is the in-process run: losses, weights and the bytes over each cut equal, torch.equal; a party killed
and restarted mid-epoch gets its segments again in bf16 (the client replays ``add_segment`` with its ``autocast``
field) and resumes from its checkpoint to the same weights."""

from __future__ import annotations

import signal

import pytest
import torch
from torch import nn

import splitnn
from tests.helpers import assert_same_weights, at_batch, toy_dataset
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

DATA = toy_dataset(64, shape=(1, 4, 4))
FIT = dict(epochs=2, batch_size=8, seed=3, progress=False)
NAMES = ("alice", "bob", "claire")
#: bob and claire run in bf16 autocast, alice in full precision
MODES = {"alice": None, "bob": "bf16", "claire": "bf16"}


def _build(workers):
    torch.manual_seed(0)
    segments = [
        nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU()),
        nn.Sequential(nn.Linear(12, 8), nn.ReLU()),  # in bf16: what it sends claire is bf16
        nn.Sequential(nn.Linear(8, 10), nn.LogSoftmax(dim=1)),  # log_softmax: float32 under autocast
    ]
    return splitnn.SplitNN(segments, workers, optimizer="adamw:lr=0.01,weight_decay=0.1")


def _in_process(modes):
    model = _build([splitnn.VirtualWorker(n, autocast=modes[n]) for n in NAMES])
    history = model.fit(DATA, **FIT)
    return model, history.losses()


def _traffic(model, src, dst):
    return sum(l.nbytes for l in model.ledger.links() if (l.src, l.dst) == (src, dst) and l.kind == "activation")


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("amp"), lifetime=250, tcp=False) as cl:
        _start(cl, NAMES)
        yield cl


def _start(cl, names, listen="127.0.0.1:0"):
    for n in names:
        cl.start(n, "--state-dir", str(cl.root / f"{n}-state"), "--peer-timeout", "30", listen=listen)


def _connect(cl):
    return [splitnn.connect(cl.workers[n].url, token=cl.token, name=n, autocast=MODES[n]) for n in NAMES]


def test_parties_in_bf16_train_across_processes_as_in_process_and_send_bf16_over_the_cut(trio):
    workers = _connect(trio)
    assert [w.autocast for w in workers] == [None, torch.bfloat16, torch.bfloat16]  # as VirtualWorker.autocast
    try:
        model = _build(workers)
        losses = model.fit(DATA, **FIT).losses()
        got = model.collect()
    finally:
        for w in workers:
            w.close()
    twin, twin_losses = _in_process(MODES)
    assert losses == twin_losses
    assert_same_weights(got, twin.collect())
    assert [l for l in model.ledger.links() if l.kind in ("activation", "gradient")] == [
        l for l in twin.ledger.links() if l.kind in ("activation", "gradient")
    ]
    full, full_losses = _in_process(dict.fromkeys(NAMES))
    assert full_losses != losses  # the field took effect at the workers
    # bob's bf16 output crosses to claire at half the bytes; alice (full precision) sends float32 to bob
    assert 2 * _traffic(model, "bob", "claire") == _traffic(full, "bob", "claire")
    assert _traffic(model, "alice", "bob") == _traffic(full, "alice", "bob")
    assert all(t.dtype == torch.float32 for t in got.state_dict().values())  # weights stay float32


def test_a_bf16_party_killed_and_restarted_mid_epoch_resumes_in_bf16(tmp_path, trio):
    """The restarted bob holds nothing: the researcher's reconnection replays its ``add_segment`` (autocast field
    included) and fit loads bob's checkpoint; in full precision there the weights would differ."""
    twin, _ = _in_process(MODES)
    workers = _connect(trio)
    model = _build(workers)

    def kill_and_restart_bob():
        bob = trio.workers["bob"]
        bob.proc.send_signal(signal.SIGKILL)
        assert bob.exited(30)
        _start(trio, ["bob"], listen=bob.address)  # the operator restarts it: same address and --state-dir

    try:
        seen = at_batch(model, 7, kill_and_restart_bob)  # mid-epoch (8 batches an epoch), after step 4's checkpoint
        model.fit(DATA, checkpoint_dir=tmp_path / "ck", checkpoint_every=4, retries=3, **FIT)
        assert seen[0] > 16  # the steps after the checkpoint were trained again
        assert_same_weights(model.collect(), twin.collect())
    finally:
        for w in workers:
            w.close()
