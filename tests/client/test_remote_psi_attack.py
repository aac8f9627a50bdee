"""Private set intersection cannot be turned against a party (issue 24, item 3), with `splitnn worker` processes.

The attack: a researcher holding the federation token places a dataset of guessed ids (P0000-P0999) at another
party, runs one PSI of it against hospital_a's table, applies it and reads the result back -- all of hospital_a's
ids. Now every party runs PSI only over the datasets its operator loaded (`--data`), so the probe is refused
where it was placed (policy rule psi_operator_data), in either role and also when hospital_a's policy names
only the lab as its peer; and the probe learns nothing (it keeps all its rows). Each party's policy decides
with whom it runs PSI (``psi_peers``, by default ``peers``) and how many runs each dataset takes part in over
the worker's life (``max_psi_runs``: another session does not start the count afresh). Each test asserts the
rule that refused, so weakening only that rule fails it."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch

import splitnn
from splitnn.errors import PolicyError, WorkerError
from splitnn.training.alignment import intersect
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

A, B, LAB, CLINIC = "hospital_a", "hospital_b", "lab", "clinic"
GUESSES = [f"P{i:04d}" for i in range(1000)]  # the attacker's probe: every id of the format


def _ids(seed: int, n: int) -> list[str]:
    return [GUESSES[i] for i in np.random.default_rng(seed).choice(len(GUESSES), size=n, replace=False)]


#: each party's ids: hospital_a holds 300 of the 1000, in an order of its own
IDS = {A: _ids(1, 300), B: _ids(2, 400), LAB: _ids(3, 500), CLINIC: _ids(4, 200)}


def _write(path, ids, label: bool) -> str:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "y" if label else "x"])
        w.writerows([s, int(s[1:]) % 2 if label else int(s[1:])] for s in ids)
    return f"table:{path},id=id" + (",label=y" if label else "")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("psi-attack")
    policies = {A: {"peers": [LAB]}, CLINIC: {"psi_peers": [LAB], "max_psi_runs": 1}}
    with Cluster(root / "cluster") as cl:
        for party in (A, B, LAB, CLINIC):
            args = []
            if party != CLINIC:
                args += ["--data", "p=" + _write(root / f"{party}-p.csv", IDS[party], party == LAB)]
            if party != A:
                args += ["--data", "c=" + _write(root / f"{party}-c.csv", IDS[party], party == LAB)]
            if party in (B, CLINIC):
                args += ["--data", "d=" + _write(root / f"{party}-d.csv", IDS[party], False)]
            if party in policies:
                (root / f"{party}.json").write_text(json.dumps(policies[party]))
                args += ["--policy", str(root / f"{party}.json")]
            cl.start(party, *args)
        yield cl
        assert all(w.alive() for w in cl.workers.values()), "a worker died during the tests"


def _connect(cluster) -> dict[str, splitnn.RemoteWorker]:
    workers = dict(zip(cluster.workers, cluster.connect(*cluster.workers)))
    for w in workers.values():
        w.connect_peers(workers)  # each session names the others as its peers (as intersect does)
    return workers


@pytest.fixture()
def remote(cluster):
    workers = _connect(cluster)
    yield workers
    for w in workers.values():
        w.close()


def _errors(*workers) -> dict[str, str]:
    """The first error of each worker's pipelined commands (by worker name; none: left out)."""
    out = {}
    for w in workers:
        try:
            w.drain()
        except (PolicyError, WorkerError) as exc:
            out[w.name] = str(exc)
    return out


def _refusal(worker: str, rule: str, what: str) -> str:
    return re.escape(f"worker {worker!r} refuses private set intersection {what} (policy rule {rule})")


def _probe(worker) -> None:
    """The attacker's probe: every guessed id, each row's value naming it (to read back which rows are left)."""
    numbers = torch.tensor([float(s[1:]) for s in GUESSES]).view(-1, 1)
    worker.add_dataset("probe", features=numbers, ids=GUESSES)


def test_a_probe_of_guessed_ids_placed_at_the_lab_is_refused_in_either_role_and_learns_nothing(remote):
    a, lab = remote[A], remote[LAB]
    _probe(lab)  # hospital_a's policy names only the lab as its peer: the probe goes there
    operator_rule = _refusal(LAB, "psi_operator_data", "over dataset 'probe'")

    # the attack: the lab, as the client, over the probe; hospital_a answers over its own table
    lab.psi_finish("s1", a.psi_reply("p", lab.psi_request("s1", "probe")))
    errors = _errors(lab, a)
    assert re.search(operator_rule, errors[LAB]), errors  # refused before the lab computed a request
    assert A in errors  # hospital_a had nothing to answer: the request it would have pulled was never made
    with pytest.raises(WorkerError, match="no intersection was computed for dataset 'probe'"):
        lab.psi_apply("probe")
    for w, name in ((lab, "probe"), (a, "p")):
        w.psi_cancel(name)
    # read back: the probe keeps every guessed row, so its size says nothing of hospital_a's ids
    assert lab.dataset_stats("probe").size == lab.psi_size("probe") == len(GUESSES)

    # the other role: hospital_a, as the client, over its table; the lab answers over the probe
    a.psi_finish("s2", lab.psi_reply("probe", a.psi_request("s2", "p")))
    errors = _errors(a, lab)
    assert re.search(operator_rule, errors[LAB]), errors
    for w, name in ((lab, "probe"), (a, "p")):
        w.psi_cancel(name)
    assert a.psi_size("p") == len(IDS[A])  # hospital_a's candidates were not narrowed to the probe's ids

    # and through the researcher's usual call, the probe under hospital_a's dataset name
    lab.add_dataset("p2", features=torch.zeros(len(GUESSES), 1), ids=GUESSES)
    with pytest.raises(PolicyError, match=_refusal(LAB, "psi_operator_data", "over dataset 'p2'")):
        intersect("p2", [a], lab)


def test_a_probe_at_a_party_that_is_not_hospital_as_peer_is_refused_by_both(remote):
    a, b = remote[A], remote[B]
    _probe(b)
    b.psi_finish("s1", a.psi_reply("p", b.psi_request("s1", "probe")))
    errors = _errors(b, a)
    assert re.search(_refusal(B, "psi_operator_data", "over dataset 'probe'"), errors[B]), errors
    # hospital_a refuses hospital_b by its `peers` rule (no psi_peers rule: the peers rule decides), before pulling
    assert re.search(_refusal(A, "peers", "with 'hospital_b'"), errors[A]), errors
    assert "without a psi_peers rule, the peers rule decides" in errors[A]
    for w, name in ((b, "probe"), (a, "p")):
        w.psi_cancel(name)


def test_psi_peers_defaults_to_peers_even_over_the_operators_own_tables(remote):
    a, b, lab = remote[A], remote[B], remote[LAB]
    common = set(IDS[A]) & set(IDS[LAB])
    assert intersect("p", [a], lab).size == len(common)  # the lab is hospital_a's peer: allowed
    # hospital_b's table is its operator's, but hospital_a runs PSI only with the lab: as the server ...
    b.psi_finish("s1", a.psi_reply("p", b.psi_request("s1", "p")))
    errors = _errors(a, b)
    assert re.search(_refusal(A, "peers", "with 'hospital_b'"), errors[A]), errors
    for w in (a, b):
        w.psi_cancel("p")
    # ... and as the client: its request is not handed to hospital_b
    a.psi_finish("s2", b.psi_reply("p", a.psi_request("s2", "p")))
    errors = _errors(b, a)
    assert re.search(_refusal(A, "peers", "with 'hospital_b'"), errors[B]), errors
    for w in (a, b):
        w.psi_cancel("p")


def test_psi_peers_names_the_only_parties_a_party_runs_psi_with(remote):
    b, clinic = remote[B], remote[CLINIC]
    refused = _refusal(CLINIC, "psi_peers", "with 'hospital_b'")
    # as the server: it does not pull hospital_b's request
    b.psi_finish("s1", clinic.psi_reply("c", b.psi_request("s1", "c")))
    errors = _errors(clinic, b)
    assert re.search(refused, errors[CLINIC]), errors
    for w in (clinic, b):
        w.psi_cancel("c")
    # as the client: its request is not handed to hospital_b (over "d": "c" is the run-count test's)
    clinic.psi_finish("s2", b.psi_reply("d", clinic.psi_request("s2", "d")))
    errors = _errors(b, clinic)
    assert re.search(refused, errors[B]), errors
    for w in (clinic, b):
        w.psi_cancel("d")


def test_max_psi_runs_counts_over_the_workers_life_not_per_session(cluster, remote):
    clinic, lab = remote[CLINIC], remote[LAB]
    assert intersect("c", [clinic], lab).size == len(set(IDS[CLINIC]) & set(IDS[LAB]))  # its one run
    other = _connect(cluster)  # another session (the researcher's, or anyone's)
    try:
        with pytest.raises((PolicyError, WorkerError), match=_refusal(CLINIC, "max_psi_runs", "over dataset 'c'")):
            intersect("c", [other[CLINIC]], other[LAB])
    finally:
        for w in other.values():
            w.close()
