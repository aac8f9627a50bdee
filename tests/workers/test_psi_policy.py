"""A party's policy over private set intersection, in process (the networked attack is in
tests/client/test_remote_psi_attack.py): PSI runs only over datasets the party placed itself, never over one an
intersection derived; ``psi_peers`` (by default ``peers``) names the parties it runs PSI with; ``max_psi_runs`` caps
the runs per dataset; a PSI message reaches no segment; the rows an intersection derived are guarded as the dataset
they came from."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from splitnn.errors import ConfigurationError, PolicyError, WorkerError
from splitnn.training.alignment import intersect
from splitnn.workers import BatchRef, VirtualWorker, WorkerPolicy
from splitnn.workers.policy import load_policy


def _ids(n0: int, n1: int) -> list[str]:
    return [f"P{i:04d}" for i in range(n0, n1)]


def _party(name: str, ids: list[str], **policy) -> VirtualWorker:
    w = VirtualWorker(name, policy=WorkerPolicy(**policy))
    w.add_dataset("p", features=torch.tensor([[float(s[1:])] for s in ids]), ids=ids)
    return w


def _refusal(worker: str, rule: str, what: str) -> str:
    return re.escape(f"worker {worker!r} refuses private set intersection {what} (policy rule {rule})")


def test_the_new_rules_in_a_policy_file(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('psi_peers = ["lab"]\nmax_psi_runs = 2\n')
    policy = load_policy(path)
    assert policy == WorkerPolicy(psi_peers=("lab",), max_psi_runs=2)
    assert policy.to_dict() == {"psi_peers": ["lab"], "max_psi_runs": 2}
    for text, match in (
        ("max_psi_runs = -1", "max_psi_runs must be an integer >= 0"),
        ("max_psi_runs = true", "max_psi_runs must be an integer >= 0"),
        ('psi_peers = "lab"', "psi_peers must be a list of strings"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigurationError, match=match):
            load_policy(path)


def test_rows_an_intersection_derived_take_part_in_no_later_one_until_placed_again():
    a, lab = _party("a", _ids(0, 40)), _party("lab", _ids(10, 50))
    result = intersect("p", [a], lab, split={"train": 0.5, "test": 0.5}, seed=1)
    assert result.size == 30
    # a second run over the aligned rows, or over a part drawn at positions the researcher chose, would tell
    # which of the rows the other party holds: refused where it would start (the label holder's request)
    for name in ("p", "p:train"):
        with pytest.raises(PolicyError, match=_refusal("lab", "psi_operator_data", f"over dataset {name!r}")):
            intersect(name, [a], lab)
    lab.add_dataset("p", features=torch.zeros(40, 1), ids=_ids(10, 50), replace=True)  # the party places it again
    a.add_dataset("p", features=torch.zeros(40, 1), ids=_ids(0, 40), replace=True)
    assert intersect("p", [a], lab).size == 30


def test_parts_are_named_after_their_dataset_and_a_refused_apply_keeps_the_run():
    a, lab = _party("a", _ids(0, 10)), _party("lab", _ids(0, 10))
    a.connect_peers({"lab": lab})
    lab.connect_peers({"a": a})
    lab.psi_finish("s", a.psi_reply("p", lab.psi_request("s", "p")))
    with pytest.raises(WorkerError, match="a part of dataset 'p' must be named 'p:PART', not 'other'"):
        lab.psi_apply("p", {"other": torch.arange(3)})
    assert "other" not in lab.datasets()
    lab.psi_apply("p", {"p:x": torch.arange(3)})
    assert lab.dataset("p:x").ids == _ids(0, 3)


def test_psi_peers_defaults_to_peers_and_guards_both_roles():
    ids = _ids(0, 20)
    for rule, policy in (("psi_peers", {"psi_peers": ("lab",)}), ("peers", {"peers": ("lab",)})):
        a, b, lab = _party("a", ids, **policy), _party("b", ids), _party("lab", ids)
        assert intersect("p", [a, b], lab).size == 20  # a talks only with the lab: allowed
        for w in (a, b):
            w.add_dataset("p", features=torch.zeros(20, 1), ids=ids, replace=True)
        with pytest.raises(PolicyError, match=_refusal("a", rule, "with 'b'")):
            intersect("p", [b], a)  # a as the client: its request is not handed to b
        with pytest.raises(PolicyError, match=_refusal("a", rule, "with 'b'")):
            intersect("p", [a], b)  # a as the server: it does not answer b
    # psi_peers, when given, decides PSI alone: the peers rule is for the model's tensors
    a, b = _party("a", ids, peers=("lab",), psi_peers=("b",)), _party("b", ids)
    assert intersect("p", [b], a).size == 20


def test_max_psi_runs_counts_each_run_once_per_dataset_and_zero_forbids_psi():
    ids = _ids(0, 20)
    a, b, lab = _party("a", ids, max_psi_runs=1), _party("b", ids), _party("lab", ids)
    assert intersect("p", [a, b], lab).size == 20  # one run at a, though it sends and answers a message in it
    for w in (a, lab):
        w.add_dataset("p", features=torch.zeros(20, 1), ids=ids, replace=True)
    with pytest.raises(PolicyError, match=_refusal("a", "max_psi_runs", "over dataset 'p'")):
        intersect("p", [a], lab)
    assert a.psi_runs.count("p") == 1  # the refused run is not counted
    none = _party("n", ids, max_psi_runs=0)
    with pytest.raises(PolicyError, match=_refusal("n", "max_psi_runs", "over dataset 'p'")):
        intersect("p", [none], lab)


def test_the_datasets_rule_decides_which_datasets_take_part():
    a, lab = _party("a", _ids(0, 10), datasets=("other",)), _party("lab", _ids(0, 10))
    with pytest.raises(PolicyError, match=r"worker 'a' refuses dataset 'p' \(policy rule datasets\)"):
        intersect("p", [a], lab)


def test_a_psi_message_reaches_no_segment():
    a, lab = _party("a", _ids(0, 10)), _party("lab", _ids(0, 10))
    a.connect_peers({"lab": lab})
    lab.connect_peers({"a": a})
    for w in (a, lab):
        w.add_segment("identity", nn.Identity(), None)
    with pytest.raises(WorkerError, match="is not a activation"):
        a.forward("identity", lab.psi_request("s1", "p"), train=False)  # a peer's message, as an activation
    with pytest.raises(WorkerError, match="is not a activation"):
        lab.forward("identity", lab.psi_request("s2", "p"), train=False)  # its own, to fetch the output


def test_rows_an_intersection_derived_are_guarded_as_the_partys_own():
    """A networked session holds the party's --data datasets as its own (``own_datasets``); the aligned rows and
    their parts are that data too, so the policy's rules on reading it apply to them (an identity segment on
    ``p:train`` is refused as on ``p``)."""
    a = _party("a", _ids(0, 10), refuse_passthrough=True)
    a.own_datasets = frozenset({"p"})
    lab = _party("lab", _ids(0, 10))
    intersect("p", [a], lab, split={"train": 0.5}, seed=0)
    a.add_segment("identity", nn.Identity(), None)
    for name in ("p", "p:train"):
        with pytest.raises(
            PolicyError, match=r"refuses segment 'identity' on dataset .* \(policy rule refuse_passthrough\)"
        ):
            a.forward("identity", BatchRef(name, torch.arange(2)), train=False)


def test_own_datasets_are_the_placed_ones_and_what_an_intersection_derived_from_them():
    """One record of what an intersection derived: ``own_datasets`` is read from it, so a derived dataset stops
    being the party's own exactly when it is replaced (and a placed one never does)."""
    a = _party("a", _ids(0, 10))
    a.add_dataset("other", features=torch.zeros(4, 1), ids=_ids(0, 4))
    lab = _party("lab", _ids(0, 10))
    lab.add_dataset("other", labels=torch.zeros(4, dtype=torch.long), ids=_ids(0, 4))
    intersect("other", [a], lab, split={"train": 0.5}, seed=0)  # (every dataset its own, so far)
    a.own_datasets = frozenset({"p"})
    intersect("p", [a], lab, split={"train": 0.5, "test": 0.5}, seed=0)
    assert a.own_datasets == {"p", "p:train", "p:test"}  # not the rows derived from a dataset it does not own
    a.add_dataset("p:train", features=torch.zeros(2, 1), replace=True)  # no longer the party's rows
    assert a.own_datasets == {"p", "p:test"}
    a.own_datasets = None  # every dataset held here is its own
    assert a.own_datasets is None
