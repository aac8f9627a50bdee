"""Checkpoints, faults and a party's policy across real worker processes.

The oracle is an uninterrupted in-process run of the same model: a networked run gives the
same weights bit for bit, so an interrupted-and-resumed networked run must too -- after the
researcher's process died (new sessions resume from the parties' --state-dir), after a party
was SIGKILLed and restarted (``fit(retries=...)`` reconnects and resumes by itself), and after
a dropped connection (a link emulator cuts it).
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from torch import nn

import splitnn
from splitnn.errors import PolicyError
from splitnn.testing.linkemu import ThreadedLinkEmulator
from splitnn.training import MultiHolderSplitNN, VerticalSplitNN
from splitnn.wire.fingerprint import fingerprint
from splitnn.workers import BatchRef
from splitnn.workers.audit import read_audit
from tests.helpers import assert_same_weights, at_batch, toy_dataset
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

DATA = toy_dataset(320, shape=(1, 8, 8))


def held(part: str) -> tuple[str, ...]:
    """The flags that have a party hold ``part`` of the same images itself (``splitnn worker --data toy=...``)."""
    return ("--data", f"toy=tests.workers.task_data:toy_images,parts={part}", "--trust", "tests.workers.task_data")


FIT = dict(epochs=2, batch_size=32, seed=3, progress=False)


class Crash(Exception):
    """Stands for the researcher's process dying."""


def chain_segments():
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU()),
        nn.Sequential(nn.Linear(32, 16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 10), nn.LogSoftmax(dim=1)),
    ]


def in_process_reference(build):
    model = build([splitnn.VirtualWorker(n) for n in ("alice", "bob", "claire")])
    model.fit(DATA, **FIT)
    return model.collect()


def start(cl: Cluster, names, *extra, listen: str = "127.0.0.1:0"):
    for n in names:
        cl.start(n, "--state-dir", str(cl.root / f"{n}-state"), "--peer-timeout", "30", *extra, listen=listen)


def connect(cl: Cluster, names, timeout: float = 60, **kw):
    return [splitnn.connect(cl.workers[n].url, token=cl.token, name=n, timeout=timeout, **kw) for n in names]


def crash_after(model, losses: int) -> None:
    """The researcher dies after ``losses`` batches' losses reached it (shipped epochs or batch by batch)."""
    seen = [0]

    def count():
        seen[0] += 1
        if seen[0] > losses:
            raise Crash

    train_epoch = model.train_epoch

    def crashing_train_epoch(name, batches, on_batch, **kw):
        def watch(stats):
            count()
            on_batch(stats)

        return train_epoch(name, batches, watch, **kw)

    model.train_epoch = crashing_train_epoch


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """alice, bob and claire, each with a --state-dir, shared by the tests that leave them running."""
    with Cluster(tmp_path_factory.mktemp("trio"), lifetime=280) as cl:
        start(cl, ("alice", "bob", "claire"))
        yield cl


def chain(optimizer):
    return lambda ws: splitnn.SplitNN(chain_segments(), ws, optimizer=optimizer)


def multi(ws):
    torch.manual_seed(0)
    bottom = nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.ReLU())
    top = [nn.Sequential(nn.Linear(20, 10), nn.LogSoftmax(dim=1))]
    return MultiHolderSplitNN(bottom, top, ws[:2], ws[2], turn_batches=3, optimizer="sgd:lr=0.05,momentum=0.9")


def vertical(ws):
    torch.manual_seed(0)
    bottoms = [nn.Sequential(nn.Linear(32, 12), nn.ReLU()), nn.Sequential(nn.Linear(32, 12), nn.ReLU())]
    top = [nn.Sequential(nn.Linear(24, 10), nn.LogSoftmax(dim=1))]
    return VerticalSplitNN(bottoms, ws[:2], top, ws[2], optimizer="adam:lr=0.01")


@pytest.mark.parametrize(
    "build",
    [chain("sgd:lr=0.05,momentum=0.9"), chain("adam:lr=0.01"), multi, vertical],
    ids=["chain-sgd-momentum", "chain-adam", "multi-holder", "vertical"],
)
def test_a_researcher_that_died_resumes_from_the_parties_checkpoints(build, tmp_path, trio):
    reference = in_process_reference(build)
    names = ("alice", "bob", "claire")
    cl = trio
    workers = connect(cl, names)
    model = build(workers)
    crash_after(model, 13)  # mid-epoch (10 batches an epoch), between checkpoints
    with pytest.raises(Crash):
        model.fit(DATA, checkpoint_dir=tmp_path / "ck", checkpoint_every=4, **FIT)
    for w in workers:
        w.close()
    workers = connect(cl, names)  # a new process: new sessions; the parties' state dirs hold the rest
    model = build(workers)
    model.fit(DATA, checkpoint_dir=tmp_path / "ck", checkpoint_every=4, resume=True, **FIT)
    assert_same_weights(model.collect(), reference)
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["step"] == 20 and set(manifest["parties"]) == set(names)
    assert not (tmp_path / "ck" / "parties").exists()  # networked parties wrote into their own state dirs
    for w in workers:
        w.close()


@pytest.mark.slow
@pytest.mark.parametrize("plane", ["grpc", "tcp"], ids=["grpc-links", "tcp-links-new-port"])
def test_a_party_killed_and_restarted_mid_epoch_is_survived_by_fit_retries(tmp_path, plane):
    """With TCP links bob comes back on another data-plane port (its gRPC address is the same): the researcher's
    reconnection tells alice and claire where to dial it now."""
    build = chain("adam:lr=0.01")
    reference = in_process_reference(build)
    names = ("alice", "bob", "claire")
    plane_flags = ("--data-listen", "127.0.0.1:0") if plane == "tcp" else ()
    with Cluster(tmp_path, lifetime=250, tcp=False) as cl:
        start(cl, names, *plane_flags)
        workers = connect(cl, names)
        model = build(workers)
        first_port = workers[1].data_address

        def kill_and_restart_bob():
            bob = cl.workers["bob"]
            bob.proc.send_signal(signal.SIGKILL)
            assert bob.exited(30)
            start(cl, ["bob"], *plane_flags, listen=bob.address)  # the operator restarts it: same --state-dir
            assert cl.workers["bob"].address == bob.address

        seen = at_batch(model, 7, kill_and_restart_bob)  # mid-epoch, after the checkpoint at step 4
        history = model.fit(DATA, checkpoint_dir=tmp_path / "ck", checkpoint_every=4, retries=3, **FIT)
        assert seen[0] > 20  # the steps after the checkpoint were trained again
        assert len(history.epochs) == 2
        assert_same_weights(model.collect(), reference)
        events = read_audit(tmp_path / "bob-state" / "audit.jsonl")
        assert [e["step"] for e in events if e["event"] == "restore"] == [4]  # the restarted bob loaded step 4
        if plane == "tcp":
            assert workers[1].data_address != first_port  # it did come back elsewhere
        for w in workers:
            w.close()


def test_a_dropped_connection_is_survived(tmp_path, trio):
    build = chain("sgd:lr=0.05,momentum=0.9")
    reference = in_process_reference(build)
    names = ("alice", "bob", "claire")
    cl = trio
    with ThreadedLinkEmulator() as emu:
        proxied = {n: emu.add(n, cl.workers[n].address) for n in names}
        workers = [splitnn.connect(f"grpc://{proxied[n]}", token=cl.token, name=n, timeout=60) for n in names]
        model = build(workers)

        def drop_bob():
            assert emu.drop("bob") > 0  # every connection into bob is reset; new ones get through

        at_batch(model, 6, drop_bob)
        model.fit(DATA, checkpoint_dir=tmp_path / "ck", checkpoint_every=4, retries=3, **FIT)
        assert_same_weights(model.collect(), reference)
        for w in workers:
            w.close()


@pytest.mark.slow
def test_a_hung_party_is_noticed_in_bounded_time_and_survived_when_it_comes_back(tmp_path, trio, monkeypatch):
    """SIGSTOP freezes bob (its connections stay open, nothing answers): the researcher's keepalive pings
    go unanswered and the connection is declared dead within ~15 s, well before any timeout; bob is
    thawed 20 s later and its stream is resumed, or fit's retries resume from the last checkpoint."""
    import threading
    import time

    import splitnn.split.fit as loop

    build = chain("sgd:lr=0.05,momentum=0.9")
    reference = in_process_reference(build)
    workers = connect(trio, ("alice", "bob", "claire"), timeout=120)  # timeouts far beyond the keepalive's bound
    model = build(workers)
    bob = trio.workers["bob"].proc
    stopped, noticed = [], []
    recover = loop._recover

    def noting_recover(*args, **kwargs):
        noticed.append(time.monotonic() - stopped[0])
        return recover(*args, **kwargs)

    monkeypatch.setattr(loop, "_recover", noting_recover)
    # bob's stream may also be resumed where it stood once bob thaws, with no checkpoint route at all
    from splitnn.client.command_stream import CommandStream

    resume = CommandStream._resume

    def noting_resume(self, cause):
        noticed.append(time.monotonic() - stopped[0])
        return resume(self, cause)

    monkeypatch.setattr(CommandStream, "_resume", noting_resume)
    train_epoch = model.train_epoch

    seen = [0]

    def freezing_train_epoch(name, batches, on_batch, **kw):
        def watch(stats):
            seen[0] += 1
            if seen[0] == 6:  # mid-epoch, after the checkpoint at step 4
                stopped.append(time.monotonic())
                bob.send_signal(signal.SIGSTOP)
                threading.Timer(20.0, bob.send_signal, (signal.SIGCONT,)).start()
            on_batch(stats)

        return train_epoch(name, batches, watch, **kw)

    model.train_epoch = freezing_train_epoch
    try:
        model.fit(DATA, checkpoint_dir=tmp_path / "ck", checkpoint_every=4, retries=6, **FIT)
    finally:
        bob.send_signal(signal.SIGCONT)
    assert stopped and noticed and noticed[0] < 20.0  # the keepalive, not a 120 s timeout, found the fault
    assert_same_weights(model.collect(), reference)
    for w in workers:
        w.close()


# -- the party's policy, across processes -----------------------------------------------------------------
def test_alices_policy_refuses_an_identity_first_segment_before_any_batch(tmp_path):
    policy = tmp_path / "alice-policy.toml"
    # a data holder is closed by default; accept_any_segment leaves the heuristic to judge the segments
    policy.write_text("refuse_passthrough = true\nmin_reduction = 2.0\naccept_any_segment = true\n")
    with Cluster(tmp_path, lifetime=200) as cl:
        # alice's own images (the rule guards a party's own data; what the researcher places is its own)
        cl.start("alice", *held("features"), "--policy", str(policy), "--audit-log", str(tmp_path / "alice.jsonl"))
        cl.start("bob", *held("labels"))
        alice, bob = connect(cl, ("alice", "bob"))
        for first, rule in ((nn.Identity(), "refuse_passthrough"), (nn.Flatten(), "refuse_passthrough")):
            model = splitnn.SplitNN(
                [first, nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.LogSoftmax(1))], [alice, bob]
            )
            with pytest.raises(
                PolicyError,
                match=rf"worker 'alice' refuses segment '{model.stages[0].key}' on dataset 'toy' "
                rf"\(policy rule {rule}\): it only moves values around",
            ):
                model.fit("toy", **FIT)
            assert model.ledger.total(kind="activation") == 0  # nothing reached bob
        permutation = nn.Sequential(nn.Flatten(), nn.Linear(64, 64, bias=False))
        with torch.no_grad():
            permutation[1].weight.copy_(torch.eye(64)[torch.randperm(64)])
        model = splitnn.SplitNN([permutation, nn.Sequential(nn.Linear(64, 10), nn.LogSoftmax(1))], [alice, bob])
        with pytest.raises(PolicyError, match=r"\(policy rule refuse_passthrough\): its first weighted layer"):
            model.fit("toy", **FIT)
        good = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        model = splitnn.SplitNN([good, nn.Sequential(nn.Linear(16, 10), nn.LogSoftmax(1))], [alice, bob])
        model.fit("toy", epochs=1, batch_size=32, progress=False)
        model.fit(DATA, epochs=1, batch_size=32, progress=False)  # the researcher's own data: not alice's to guard
        for w in (alice, bob):
            w.close(end_session=True)
    events = read_audit(tmp_path / "alice.jsonl")
    assert events[0]["event"] == "start" and events[0]["datasets"] == ["toy"]
    assert events[0]["policy"] == {
        "refuse_passthrough": True,
        "min_reduction": 2.0,
        "release_outputs": False,
        "release_weights": False,
        "min_batch_size": 8,
        "draw_rows": True,
        "release_grad_norms": False,
    }
    assert [e["rule"] for e in events if e["event"] == "refusal"] == ["refuse_passthrough"] * 3
    installed = [e for e in events if e["event"] == "segment"]
    assert installed[-1]["fingerprint"] == fingerprint(good)
    assert [(e["dataset"], e["part"]) for e in events if e["event"] == "dataset_read"] == [("toy", "features")]
    sent = {(e["to"], e["kind"]) for e in events if e["event"] == "sent"}
    assert ("bob", "activation") in sent
    assert events[-1]["event"] == "stop"


def test_accepted_fingerprints_and_max_params(tmp_path):
    good = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
    policy = tmp_path / "alice-policy.json"
    policy.write_text(json.dumps({"accept_segments": [fingerprint(good)], "max_params": 2000}))
    with Cluster(tmp_path, lifetime=200) as cl:
        cl.start("alice", "--policy", str(policy))
        cl.start("bob")
        alice, bob = connect(cl, ("alice", "bob"))
        top = nn.Sequential(nn.Linear(16, 10), nn.LogSoftmax(1))
        splitnn.SplitNN([good, top], [alice, bob]).fit(DATA, epochs=1, batch_size=32, progress=False)
        other = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh())
        with pytest.raises(
            PolicyError, match=rf"\(policy rule accept_segments\): its fingerprint {fingerprint(other)}"
        ):
            splitnn.SplitNN([other, top], [alice, bob])
        for w in (alice, bob):
            w.close()


def test_only_the_models_adjacent_parties_may_pull_a_partys_tensors(trio):
    cl = trio
    workers = connect(cl, ("alice", "bob", "claire"))
    alice, bob, claire = workers
    model = splitnn.SplitNN(chain_segments(), workers, ship_epochs=False)
    name, _ = model.prepare(DATA)
    activation = alice.forward(model.stages[0].key, BatchRef(name, torch.arange(4)))
    claire.forward(model.stages[2].key, activation)  # claire tries to read what alice made for bob
    with pytest.raises(splitnn.WorkerError, match=r"'claire' is not adjacent to 'alice' in the model"):
        claire.drain()
    for w in workers:
        w.close()
