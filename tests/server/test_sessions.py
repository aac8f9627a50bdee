"""A worker as a shared service: sessions of different researchers are isolated, a closed or dead
session's state is freed (tensors at once, segments after the grace period), hostile connections
and inputs cannot lock researchers out, and a stopped worker prints one line."""

from __future__ import annotations

import copy
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from torch import nn

import splitnn
from splitnn.client import SessionNotFound
from splitnn.common.messages import session_tag
from splitnn.errors import ConfigurationError, PolicyError, WorkerError
from splitnn.models import tutorial_mlp
from splitnn.transport import frames
from splitnn.wire.proto import CALL, PEER, Command, Reply
from splitnn.wire.spec import module_to_spec, spec_to_json
from splitnn.wire.state_codec import encode_state
from tests.helpers import assert_fit_equals_in_process, assert_same_weights, toy_dataset
from tests.transport.cluster import Cluster, open_files_prefix

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]
NAMES = ("alice", "bob", "claire")
REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


#: Seconds a closed session is kept at the workers of :func:`graced`.
GRACE = 2
#: Lifetime of the module's workers: the module runs for minutes on a busy machine.
LIFETIME = 3600


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("sessions"), lifetime=LIFETIME) as cl:
        cl.start_many(NAMES)
        yield cl
        assert all(w.alive() for w in cl.workers.values()), "a worker died during the tests"


@pytest.fixture(scope="module")
def graced(tmp_path_factory):
    """alice and bob keeping a closed session :data:`GRACE` s, alice with a soft open-files limit of 1024 at its
    start (which it raises): shared by the lifecycle and flood tests."""
    with Cluster(tmp_path_factory.mktemp("graced"), lifetime=LIFETIME) as cl:
        cl.start("alice", "--session-grace", str(GRACE), prefix=open_files_prefix(1024))
        cl.start("bob", "--session-grace", str(GRACE))
        yield cl
        assert all(w.alive() for w in cl.workers.values()), "a worker died during the tests"


def _connect(cl: Cluster, names=NAMES, **kw) -> list[splitnn.client.remote.RemoteWorker]:
    return [splitnn.connect(cl.workers[n].url, token=cl.token, name=n, timeout=60, **kw) for n in names]


def _raw_call(cl: Cluster, worker: str, op: str, args: dict, blobs=(), *, session: str | None = None) -> Reply:
    md = [("x-splitnn-token", cl.token), ("x-splitnn-party", "researcher")]
    if session is not None:
        md.append(("x-splitnn-session", session))
    with grpc.insecure_channel(cl.workers[worker].address) as ch:
        raw = ch.unary_unary(CALL, request_serializer=None, response_deserializer=None)(
            Command(op=op, args_json=json.dumps(args), blobs=list(blobs)).SerializeToString(),
            metadata=md,
            timeout=60,
        )
    return Reply.FromString(raw)


# --------------------------------------------------------------------------- isolation
def test_another_session_cannot_read_replace_or_remove_what_a_session_created(cluster):
    mine, theirs = _connect(cluster), _connect(cluster)
    try:
        assert mine[0].session != theirs[0].session
        torch.manual_seed(0)
        model = splitnn.SplitNN(tutorial_mlp(), mine)
        name, _ = model.prepare(toy_dataset(64))
        key = model.stages[0].key
        before = mine[0].get_state(key)
        alice = theirs[0]
        with pytest.raises(PolicyError, match="belongs to another session"):
            alice.get_state(key)
        with pytest.raises(PolicyError, match="belongs to another session"):
            alice.set_state(key, {k: torch.zeros_like(v) for k, v in before.items()}, src="researcher")
        with pytest.raises(PolicyError, match="belongs to another session"):
            alice.probe(key, (2, 1, 28, 28))
        with pytest.raises(PolicyError, match="belongs to another session"):
            alice.dataset_stats(name)
        alice.remove_segment(key)  # pipelined: its error surfaces at the next call
        with pytest.raises(PolicyError, match="belongs to another session"):
            alice.drain()
        # a one-off call from no session at all fares no better
        reply = _raw_call(cluster, "alice", "get_state", {"key": key})
        assert not reply.ok and reply.error_type == "PolicyError"
        # a segment and a dataset of theirs under the same names are their own: mine are untouched
        alice.add_segment(key, nn.Linear(2, 2), "sgd")
        alice.add_dataset(name, features=torch.zeros(2, 3))
        assert alice.probe(key, (1, 2)) == (1, 2) and alice.dataset_stats(name).size == 2
        for k, v in mine[0].get_state(key).items():
            assert torch.equal(v, before[k])
        assert mine[0].dataset_stats(name).size == 64
        # the owner trains on
        model.fit(name, epochs=1, batch_size=32, progress=False)
        # a session's own key or dataset name is not replaced silently either
        with pytest.raises(ConfigurationError, match="replace=True"):
            mine[0].add_segment(key, nn.Linear(2, 2), "sgd")
        with pytest.raises(ConfigurationError, match="replace=True"):
            mine[0].add_dataset(name, features=torch.zeros(64, 1, 28, 28))
    finally:
        for w in mine + theirs:
            w.close()


def test_peers_pull_a_sessions_tensors_only_within_it(cluster):
    """A peer stream names the session it serves; a party the session does not name, or a stream
    naming no live session, gets an ERROR frame for every pull."""
    workers = _connect(cluster)
    try:
        model = splitnn.SplitNN(tutorial_mlp(), workers)
        model.prepare(toy_dataset(32))
        md = [("x-splitnn-token", cluster.token), ("x-splitnn-party", "mallory")]
        for extra in ([("x-splitnn-peer-session", workers[0].session_tag)], [], [("x-splitnn-peer-session", "0" * 32)]):
            with grpc.insecure_channel(cluster.workers["alice"].address) as ch:
                stream = ch.stream_stream(PEER, request_serializer=None, response_deserializer=None)
                got = list(stream(iter([frames.request("activation", 1)]), metadata=md + extra, timeout=30))
            assert got and all(frames.parse(raw)[0].type == frames.ERROR for raw in got)
            text = b"".join(bytes(frames.parse(raw)[1]) for raw in got).decode()
            assert "PolicyError" in text, text
        model.fit(toy_dataset(32), epochs=1, batch_size=16, progress=False)  # the session itself is unharmed
    finally:
        for w in workers:
            w.close()


def test_hello_lists_the_partys_datasets_not_other_sessions_placements(tmp_path, shared_data):
    with Cluster(tmp_path) as cl:
        cl.start("alice", "--data", f"mnist:test={shared_data / 'mnist'},parts=features,limit=64")
        cl.start("bob", "--data", f"mnist:test={shared_data / 'mnist'},parts=labels,limit=64")
        mine, theirs = _connect(cl, ("alice", "bob")), _connect(cl, ("alice", "bob"))
        try:
            torch.manual_seed(0)
            segs = tutorial_mlp()
            model = splitnn.SplitNN([segs[0], nn.Sequential(*segs[1], *segs[2])], mine)
            name, _ = model.prepare(toy_dataset(32))
            hello = _raw_call(cl, "alice", "hello", {})
            assert json.loads(hello.result_json)["datasets"] == ["mnist:test"]
            # every session reads the party's own data; none may replace it
            assert theirs[0].dataset_stats("mnist:test").size == 64
            with pytest.raises(PolicyError, match="the party's own"):
                theirs[0].add_dataset("mnist:test", features=torch.zeros(2, 784), replace=True)
            model.fit("mnist:test", epochs=1, batch_size=32, progress=False)
            with pytest.raises(PolicyError):
                theirs[0].dataset_stats(name)
        finally:
            for w in mine + theirs:
                w.close()


def test_two_models_of_one_researcher_whose_datasets_share_a_name(cluster):
    workers = _connect(cluster)
    try:
        torch.manual_seed(1)
        s1, s2 = tutorial_mlp(), tutorial_mlp()
        twins = [splitnn.SplitNN(copy.deepcopy(s), [splitnn.VirtualWorker(n) for n in NAMES]) for s in (s1, s2)]
        models = [splitnn.SplitNN(s, workers) for s in (s1, s2)]
        d1, d2 = toy_dataset(64, seed=1, name="rand"), toy_dataset(64, seed=2, name="rand")
        models[0].prepare(d1)
        models[1].prepare(d2)
        models[0].fit(d1, epochs=1, batch_size=32, progress=False)  # on d1's data, not d2's
        models[1].fit(d2, epochs=1, batch_size=32, progress=False)
        twins[0].fit(d1, epochs=1, batch_size=32, progress=False)
        twins[1].fit(d2, epochs=1, batch_size=32, progress=False)
        for m, t in zip(models, twins):
            assert_same_weights(m.collect(), t.collect())
    finally:
        for w in workers:
            w.close()


@pytest.mark.slow
def test_concurrent_researcher_processes_and_threads_each_match_their_in_process_run(cluster):
    """Four researcher processes, two threads each, train eight different models at once on the same
    three workers (some with shipped epochs, some per operation); each ends torch.equal to its own
    in-process run."""
    cfg = {"token": cluster.token, "parties": [[n, cluster.workers[n].url] for n in NAMES]}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.server.session_jobs",
                "train",
                json.dumps({**cfg, "seeds": [2 * p, 2 * p + 1]}),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in range(4)
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            outputs.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rc, out in outputs:
        assert rc == 0 and "OK 2" in out, out[-3000:]


# --------------------------------------------------------------------------- lifecycle
def test_a_session_resumes_within_the_grace_period_and_is_freed_after_it(graced):
    cl = graced
    (w,) = _connect(cl, ("alice",))
    sid = w.session  # issued by the worker
    assert w.session_tag == session_tag(sid)
    w.add_segment("k", nn.Linear(3, 2), "sgd")
    state = w.get_state("k")
    w.close()
    (w,) = _connect(cl, ("alice",), session=sid)  # within the grace period: still there
    assert w.session == sid and w.session_tag == session_tag(sid)
    for k, v in w.get_state("k").items():
        assert torch.equal(v, state[k])
    w.close()
    # watch from another session (reconnecting with ``sid`` would resume it): "k" is someone
    # else's until the grace period ends, then nobody's
    deadline = time.monotonic() + 60  # a guard against hangs, not a measurement
    while True:
        reply = _raw_call(cl, "alice", "get_state", {"key": "k"})
        if reply.error_type != "PolicyError":
            break
        assert time.monotonic() < deadline, "the closed session was never freed"
        time.sleep(0.2)
    assert reply.error_type == "WorkerError" and "hosts no segment 'k'" in reply.error
    with pytest.raises(SessionNotFound, match="holds no session with this id"):  # gone: its id names nothing
        _connect(cl, ("alice",), session=sid)
    (w,) = _connect(cl, ("alice",))
    assert w.session != sid
    with pytest.raises(WorkerError, match="hosts no segment 'k'"):
        w.get_state("k")
    # end_session frees at once, without waiting for the grace period
    w.add_segment("k", nn.Linear(3, 2), "sgd")
    ended = w.session
    w.close(end_session=True)
    with pytest.raises(SessionNotFound):
        _connect(cl, ("alice",), session=ended)
    (w,) = _connect(cl, ("alice",))
    with pytest.raises(WorkerError, match="hosts no segment"):
        w.get_state("k")
    w.close()


def _rss_settles_below(worker, bound: int, guard: float = 60.0) -> int:
    """Poll the worker's RSS until it is below ``bound`` (or the hang guard runs out); return the last value."""
    deadline = time.monotonic() + guard
    rss = worker.rss_bytes()
    while rss >= bound and time.monotonic() < deadline:
        time.sleep(0.5)
        rss = worker.rss_bytes()
    return rss


@pytest.mark.slow
def test_researchers_killed_mid_fit_leave_the_workers_memory_where_it_was(graced):
    """Each researcher process uploads 80 MiB of features and is SIGKILLed mid-fit. After the grace
    period the worker holds none of it: its RSS stays within one such session of where it was."""
    cl = graced
    cfg = json.dumps({"token": cl.token, "parties": [[n, cl.workers[n].url] for n in ("alice", "bob")]})

    def killed_session() -> None:
        p = subprocess.Popen(
            [sys.executable, "-m", "tests.server.session_jobs", "hog", cfg],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            line = p.stdout.readline()
            while line and "READY" not in line:
                line = p.stdout.readline()
            assert "READY" in line, p.stdout.read()
        finally:
            p.kill()
            p.wait(30)

    alice = cl.workers["alice"]
    killed_session()  # warm-up: allocator pools, gRPC buffers
    time.sleep(GRACE + 1)  # the warm-up session's grace period
    baseline = alice.rss_bytes()
    for _ in range(4):
        killed_session()
    rss = _rss_settles_below(alice, baseline + 60 * MiB)
    assert rss < baseline + 60 * MiB, f"RSS grew by {(rss - baseline) / MiB:.0f} MiB over 4 killed sessions"
    # the worker serves on
    (w,) = _connect(cl, ("alice",))
    w.close()


# --------------------------------------------------------------------------- hostile input
def test_weights_that_do_not_fit_a_huge_spec_are_refused_before_building_it(cluster):
    """A 99.99M-parameter spec with mismatched weights: refused without allocating the model."""
    spec = spec_to_json(module_to_spec(nn.Linear(10_000, 9_999))).encode()  # 99.99M parameters
    state = encode_state({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)})
    alice = cluster.workers["alice"]
    before = alice.rss_bytes("VmHWM")
    reply = _raw_call(cluster, "alice", "add_segment", {"key": "big", "optimizer": None}, [spec, state])
    assert not reply.ok and "do not fit its spec" in reply.error and "wrong shape" in reply.error
    assert alice.rss_bytes("VmHWM") - before < 100 * MiB  # its peak memory: building it would take 400 MB


@pytest.mark.parametrize(
    "optimizer,needle",
    [
        ({"name": "sgd", "lr": 1e308}, "'lr' must be at most 10"),
        ({"name": "sgd", "momentum": 1e308}, "'momentum' must lie in [0, 1)"),
        ({"name": "adam", "eps": 1e308}, "'eps' must lie in (0, 1]"),
        ({"name": "sgd", "weight_decay": 1e308}, "'weight_decay' must lie in [0, 1]"),
    ],
)
def test_insane_optimizer_values_are_refused(cluster, optimizer, needle):
    spec = spec_to_json(module_to_spec(nn.Linear(3, 2))).encode()
    state = encode_state({k: v.detach() for k, v in nn.Linear(3, 2).state_dict().items()})
    reply = _raw_call(cluster, "alice", "add_segment", {"key": "k", "optimizer": optimizer}, [spec, state])
    assert not reply.ok and reply.error_type == "SpecError" and needle in reply.error, reply.error


def _open_files_soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise RuntimeError("no open-files limit")


def test_a_flood_of_idle_connections_does_not_lock_out_a_researcher(graced):
    """1,100 idle TCP connections (no token, no bytes) to a worker started with a soft open-files
    limit of 1024: a researcher still connects and trains, bit-identically."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1400:
        pytest.skip(f"the hard open-files limit ({hard}) leaves no room for 1,100 connections")
    mine = hard if hard != resource.RLIM_INFINITY else 4096
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(mine, 4096)), hard))  # this test's own 1,100

    socks: list[socket.socket] = []
    try:
        cl = graced
        alice = cl.workers["alice"]
        assert _open_files_soft_limit(alice.proc.pid) > 1100  # raised at start
        host, port = alice.address.rsplit(":", 1)
        for _ in range(1100):
            socks.append(socket.create_connection((host, int(port)), timeout=10))
        workers = _connect(cl, ("alice", "bob"))
        try:
            torch.manual_seed(2)
            segs = tutorial_mlp()
            assert_fit_equals_in_process([segs[0], nn.Sequential(*segs[1], *segs[2])], workers, toy_dataset(64))
        finally:
            for w in workers:
                w.close()
        assert alice.alive()
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --------------------------------------------------------------------------- stopping
def test_a_worker_stopped_while_serving_a_session_prints_one_line(tmp_path):
    with Cluster(tmp_path) as cl:
        cl.start_many(("alice", "bob"))
        workers = _connect(cl, ("alice", "bob"))
        try:
            segs = tutorial_mlp()
            model = splitnn.SplitNN([segs[0], nn.Sequential(*segs[1], *segs[2])], workers)
            model.fit(toy_dataset(64), epochs=1, batch_size=32, progress=False)
            # the researcher's sessions and the peer streams are still open
            assert cl.stop("alice", signal.SIGTERM) == 0
            assert cl.stop("bob", signal.SIGTERM) == 0
        finally:
            for w in workers:
                w.close()
        for n in ("alice", "bob"):
            lines = cl.workers[n].log.read_text().splitlines()
            assert lines[1:] == [f"splitnn worker {n}: stopped"], lines
