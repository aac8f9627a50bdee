"""Three parties on three "machines": each `splitnn worker` runs in its own Linux network namespace
with its own address, joined by a bridge the test creates; the researcher stays in the root namespace.

The tutorial network trains with shipped epochs (fit's default) bit-identically to the in-process run,
with the same ledger; the researcher moves no activation or gradient; and the activations demonstrably
cross between namespaces peer to peer -- by the workers' own wire counters and by the kernel's byte
counters of each party's link (the researcher's link carries far less than the activations).

Needs root and `ip` (iproute2); skips otherwise. Traffic stays on 10.213.77.0/24 inside the bridge and
namespaces created here: the bridge has no other port and no forwarding or NAT is set up. Names carry
this process's id; a lock file serialises runs (they share the subnet), and each run first removes
the namespaces and links that earlier runs left behind (same prefix).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import splitnn
from splitnn.accounting import RESEARCHER
from splitnn.models import tutorial_mlp
from tests.helpers import assert_same_weights, toy_dataset
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(300)]

PREFIX = "snnmh"  # every namespace, veth and bridge this test creates starts with it
SUBNET = "10.213.77"
BRIDGE_IP = f"{SUBNET}.1"  # the researcher's address, on the bridge in the root namespace
HOSTS = {"alice": f"{SUBNET}.11", "bob": f"{SUBNET}.12", "claire": f"{SUBNET}.13"}
PORT = 7000
NAMES = tuple(HOSTS)
LOCK = Path(tempfile.gettempdir()) / f"{PREFIX}.lock"
LOCK_WAIT = 120.0  # seconds to wait for another run of this test to finish
LIFETIME = 240.0  # each worker's --max-lifetime: it stops itself even if this process dies

N, BATCH, EPOCHS = 192, 32, 2  # 6 batches per epoch
ACT_AB = EPOCHS * N * 128 * 4  # alice -> bob activation bytes (raw float32)
ACT_BC = EPOCHS * N * 640 * 4  # bob -> claire


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def _ours(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(PREFIX)]


def _netns_names() -> list[str]:
    return _ours([line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()])


def _link_names() -> list[str]:
    # "7: snnmh123a@if2: <BROADCAST,...>" -> "snnmh123a"
    return _ours([line.split(": ")[1].split("@")[0] for line in _ip("-o", "link", "show").stdout.splitlines()])


def _remove_leftovers() -> None:
    """Delete every namespace and link with our prefix (with the lock held, no other run owns any)."""
    for link in _link_names():  # veths first (each takes its peer along), then bridges
        if not link.endswith("br"):
            _ip("link", "del", link, check=False)
    for link in _link_names():
        _ip("link", "del", link, check=False)
    for ns in _netns_names():
        _ip("netns", "del", ns, check=False)


def _disable_ipv6(link: str) -> None:
    """Keep the links quiet (no IPv6 neighbour discovery); best effort."""
    try:
        Path(f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6").write_text("1")
    except OSError:
        pass


@dataclass
class Hosts:
    """One bridge in the root namespace and one namespace + veth pair per party."""

    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    def netns(self, party: str) -> str:
        return f"{self.tag}-{party}"

    def veth(self, party: str) -> str:  # the root namespace's end, a port of the bridge
        return f"{self.tag}{party[0]}"

    def create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "type", "bridge", "nf_call_iptables", "0", check=False)
        _disable_ipv6(self.bridge)
        _ip("addr", "add", f"{BRIDGE_IP}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for party, address in HOSTS.items():
            ns, veth = self.netns(party), self.veth(party)
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _disable_ipv6(veth)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def check_routes(self) -> None:
        """Every party's address must be reached through our bridge and nothing else."""
        for address in HOSTS.values():
            route = _ip("route", "get", address).stdout
            assert f"dev {self.bridge} " in route, f"{address} would not go through {self.bridge}: {route}"

    def destroy(self) -> None:
        for party in HOSTS:
            _ip("link", "del", self.veth(party), check=False)
            _ip("netns", "del", self.netns(party), check=False)
        _ip("link", "del", self.bridge, check=False)

    def link_bytes(self) -> dict[str, tuple[int, int]]:
        """Kernel byte counters (rx, tx) as seen from the root namespace: per party its veth end
        (rx = what the party sent), and "researcher" the bridge itself (what reached this process)."""

        def read(link: str) -> tuple[int, int]:
            stats = Path(f"/sys/class/net/{link}/statistics")
            return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())

        return {RESEARCHER: read(self.bridge), **{p: read(self.veth(p)) for p in HOSTS}}


@contextlib.contextmanager
def _one_run_at_a_time() -> Iterator[None]:
    """Runs share the subnet: hold an exclusive lock on LOCK (released by the kernel if we die)."""
    with open(LOCK, "w") as fh:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.skip(f"another run of the multi-host test held {LOCK} for {LOCK_WAIT:.0f} s")
                time.sleep(0.5)
        yield


def _can_reach(party: str, hosts: Hosts, address: str) -> bool:
    """A TCP connect from inside ``party``'s namespace (no splitnn involved)."""
    code = f"import socket; socket.create_connection(({address!r}, {PORT}), timeout=5).close()"
    probe = subprocess.run(
        ["ip", "netns", "exec", hosts.netns(party), sys.executable, "-c", code],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return probe.returncode == 0


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Three namespaces with a worker each; everything is removed at teardown, even on failure."""
    if os.geteuid() != 0:
        pytest.skip("the multi-host test creates network namespaces: it needs root")
    if shutil.which("ip") is None:
        pytest.skip("the multi-host test needs iproute2's `ip`")
    with _one_run_at_a_time():
        net = Hosts()
        try:
            try:
                _remove_leftovers()
                used = _ip("-o", "addr", "show", "to", f"{SUBNET}.0/24").stdout.strip()
                if used:
                    pytest.skip(f"{SUBNET}.0/24 is already in use on this machine, not touching it: {used}")
                net.create()
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                detail = (getattr(exc, "stderr", "") or "").strip()
                pytest.skip(f"cannot create network namespaces/bridge here ({' '.join(exc.cmd)}): {detail}")
            net.check_routes()  # before any traffic
            with Cluster(tmp_path_factory.mktemp("multihost"), lifetime=LIFETIME) as cluster:
                for party, address in HOSTS.items():
                    cluster.start(party, listen=f"{address}:{PORT}", prefix=["ip", "netns", "exec", net.netns(party)])
                assert {n: w.address for n, w in cluster.workers.items()} == {
                    n: f"{a}:{PORT}" for n, a in HOSTS.items()
                }
                for src, dst in (("alice", "bob"), ("bob", "claire")):
                    if not _can_reach(src, net, HOSTS[dst]):
                        pytest.skip(
                            f"the bridge {net.bridge} does not pass TCP from {src}'s namespace to "
                            f"{dst}'s (a host firewall on bridged traffic?)"
                        )
                yield net, cluster
                assert all(w.alive() for w in cluster.workers.values()), "a worker died during the test"
        finally:  # the workers are stopped by now (Cluster's exit); remove what we created
            try:
                net.destroy()
                _remove_leftovers()
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                pass


def _counter_delta(before: list[dict], after: list[dict]) -> dict[tuple[str, str, str], int]:
    old = {(r["peer"], r["direction"], r["kind"]): r["nbytes"] for r in before}
    return {
        (r["peer"], r["direction"], r["kind"]): r["nbytes"] - old.get((r["peer"], r["direction"], r["kind"]), 0)
        for r in after
    }


def test_three_namespaces_train_bit_identically_and_peer_to_peer(hosts):
    net, cluster = hosts
    torch.manual_seed(0)
    segments = tutorial_mlp()
    initial = copy.deepcopy(segments)
    data = toy_dataset(N, seed=11)
    remote = [splitnn.connect(f"grpc://{HOSTS[n]}:{PORT}", token=cluster.token, name=n, timeout=60) for n in NAMES]
    try:
        model = splitnn.SplitNN(segments, remote, optimizer="sgd:lr=0.03")
        model.prepare(data)  # the researcher places the data: features at alice, labels at claire
        links_before = net.link_bytes()
        counters_before = [w.stats()["counters"] for w in remote]
        sent_before = [{t.kind: t.messages for t in w.counters.totals() if t.direction == "sent"} for w in remote]
        history = model.fit(data, epochs=EPOCHS, batch_size=BATCH, seed=5, progress=False)
        links_after = net.link_bytes()
        rows = [_counter_delta(b, w.stats()["counters"]) for w, b in zip(remote, counters_before)]
        sent = [
            {
                t.kind: t.messages - old.get(t.kind, 0)
                for t in w.counters.totals()
                if t.direction == "sent" and t.messages != old.get(t.kind, 0)
            }
            for w, old in zip(remote, sent_before)
        ]
        trained = model.collect()
    finally:
        for w in remote:
            w.close()

    twin = splitnn.SplitNN(initial, [splitnn.VirtualWorker(n) for n in NAMES], optimizer="sgd:lr=0.03")
    twin_history = twin.fit(data, epochs=EPOCHS, batch_size=BATCH, seed=5, progress=False)
    assert_same_weights(trained, twin.collect())
    assert history.losses() == twin_history.losses()
    assert [e.bytes_sent for e in history.epochs] == [e.bytes_sent for e in twin_history.epochs]
    assert model.ledger.links() == twin.ledger.links()
    for kind in ("activation", "gradient"):
        assert model.ledger.total(src=RESEARCHER, kind=kind) == 0
        assert model.ledger.total(dst=RESEARCHER, kind=kind) == 0
    assert model.ledger.total(src="alice", dst="bob", kind="activation") == ACT_AB

    # shipped epochs: the researcher sent each worker a handful of messages, not one per batch
    batches = EPOCHS * -(-N // BATCH)
    for w, kinds in zip(remote, sent):
        assert set(kinds) <= {"control"} and kinds.get("control", 0) < batches, (w.name, kinds)

    # the workers' own wire counters: alice pushed her activations to bob, bob his to claire, and nothing
    # but control passed between the researcher and any worker while training
    alice, bob, claire = rows
    for (src, src_rows), (dst, dst_rows), nbytes in (
        (("alice", alice), ("bob", bob), ACT_AB),
        (("bob", bob), ("claire", claire), ACT_BC),
    ):
        pushed = src_rows.get((dst, "sent", "activation"), 0)
        got = dst_rows.get((src, "recv", "activation"), 0)
        assert nbytes <= pushed <= nbytes * 1.01, (src, dst, pushed)  # raw bytes + small frame headers
        assert nbytes <= got <= nbytes * 1.01, (src, dst, got)
    for name, delta in zip(NAMES, rows):
        with_researcher = {k for (p, _, k), b in delta.items() if p == RESEARCHER and b}
        assert with_researcher <= {"control"}, (name, with_researcher)

    # ... and the kernel agrees: the activations left alice's namespace and entered claire's through
    # their own links, while the bridge's own interface (this process's link) carried a fraction of that
    rx = {k: links_after[k][0] - links_before[k][0] for k in links_after}
    tx = {k: links_after[k][1] - links_before[k][1] for k in links_after}
    assert rx["alice"] >= ACT_AB, rx  # frames alice sent
    assert tx["bob"] >= ACT_AB and rx["bob"] >= ACT_BC, (rx, tx)
    assert tx["claire"] >= ACT_BC, tx  # frames delivered to claire
    researcher = rx[RESEARCHER] + tx[RESEARCHER]
    assert researcher < ACT_AB / 4, (researcher, ACT_AB)  # measured: ~5 kB vs 197 kB
