"""A party's policy, enforced by the party (in-process here; networked in test_remote_policy.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import splitnn
from splitnn.data import epoch_batches
from splitnn.errors import ConfigurationError, PolicyError
from splitnn.wire.fingerprint import fingerprint
from splitnn.wire.spec import module_to_spec
from splitnn.workers import BatchRef, WorkerPolicy
from splitnn.workers.audit import AuditLog, read_audit
from splitnn.workers.policy import load_policy, passthrough_reason
from tests.helpers import toy_dataset

W = splitnn.VirtualWorker
DATA = toy_dataset(64, shape=(1, 8, 8), classes=4)
GOOD = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())


def top(width: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(width, 4), nn.LogSoftmax(dim=1))


# -- the file -----------------------------------------------------------------------------------------
def test_policy_files_in_toml_and_json(tmp_path):
    fp = fingerprint(GOOD)
    toml = tmp_path / "policy.toml"
    toml.write_text(
        f'release_outputs = false\naccept_segments = ["{fp}"]\nrefuse_passthrough = true\n'
        'min_reduction = 2\npeers = ["bob"]\nmax_params = 1_000_000\ndatasets = ["mnist-train"]\n'
    )
    policy = load_policy(toml)
    assert policy == WorkerPolicy(
        release_outputs=False,
        accept_segments=(fp,),
        refuse_passthrough=True,
        min_reduction=2.0,
        peers=("bob",),
        max_params=1_000_000,
        datasets=("mnist-train",),
    )
    js = tmp_path / "policy.json"
    js.write_text(json.dumps(policy.to_dict()))
    assert load_policy(js) == policy


@pytest.mark.parametrize(
    "text,match",
    [
        ("min_reduce = 2", r"unknown rule\(s\) \['min_reduce'\]"),
        ("min_reduction = -1", "min_reduction must be a positive number"),
        ('accept_segments = ["abc"]', "accept_segments\\[0\\].*not a segment fingerprint"),
        ('peers = "bob"', "peers must be a list of strings"),
        ("max_params = 0", "max_params must be a positive integer"),
        ("refuse_passthrough = 1", "refuse_passthrough must be true or false"),
        ("release_outputs = ", "not valid TOML"),
    ],
)
def test_bad_policy_files_name_the_rule(tmp_path, text, match):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=match):
        load_policy(path)


# -- the pass-through heuristic -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "segment,why",
    [
        (nn.Identity(), "only moves values around"),
        (nn.Flatten(), "only moves values around"),
        (nn.Sequential(nn.Flatten(), nn.Dropout(0.1)), "only moves values around"),
        (nn.PixelShuffle(2), "only moves values around"),
        (nn.Sequential(nn.Flatten(), nn.ReLU()), "lose nothing of non-negative data"),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 64)), "at least as wide as its input"),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 200), nn.Sigmoid()), "invertible map"),
        (nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)), "at least as wide"),
    ],
)
def test_segments_that_pass_data_through_are_recognised(segment, why):
    assert why in passthrough_reason(module_to_spec(segment))


@pytest.mark.parametrize(
    "segment",
    [
        nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU()),
        nn.Sequential(nn.Flatten(), nn.Linear(64, 16)),  # narrows: a rank-16 map of 64 values
        nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU()),
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.AvgPool2d(2), nn.Flatten()),
        nn.Sequential(nn.Flatten(), nn.Linear(64, 200), nn.Linear(200, 10)),
    ],
)
def test_segments_that_lose_information_pass(segment):
    assert passthrough_reason(module_to_spec(segment)) is None


def test_unknown_layers_cannot_be_judged():
    spec = {"type": "Sequential", "layers": [{"import": "mypkg.blocks:Block", "kwargs": {}}]}
    assert "cannot judge" in passthrough_reason(spec)


# -- enforced at the party -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "first,rule",
    [
        (nn.Identity(), "refuse_passthrough"),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 64)), "refuse_passthrough"),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU()), "min_reduction"),
    ],
)
def test_a_segment_that_would_leak_alices_data_is_refused_before_any_batch(first, rule, tmp_path):
    alice = W(
        "alice", policy=WorkerPolicy(refuse_passthrough=True, min_reduction=2), audit=AuditLog(tmp_path / "a", "alice")
    )
    bob = W("bob")
    width = 64 if not isinstance(first, nn.Sequential) else first[1].out_features
    model = splitnn.SplitNN([first, top(width)], [alice, bob])
    with pytest.raises(
        PolicyError,
        match=rf"worker 'alice' refuses segment '{model.stages[0].key}' on dataset .*"
        rf"\(policy rule {rule}\)",
    ):
        model.fit(DATA, epochs=1, batch_size=16, progress=False)
    assert model.ledger.total(kind="activation") == 0  # nothing left alice
    events = read_audit(tmp_path / "a")
    assert [e["event"] for e in events] == ["segment", "refusal"] and events[1]["rule"] == rule


def test_a_pinned_fingerprint_is_the_only_segment_accepted():
    policy = WorkerPolicy(accept_segments=(fingerprint(GOOD),), refuse_passthrough=True, min_reduction=1000)
    alice = W("alice", policy=policy)
    splitnn.SplitNN([GOOD, top(16)], [alice, W("bob")]).fit(DATA, epochs=1, batch_size=16, progress=False)
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 17), nn.ReLU())
    with pytest.raises(
        PolicyError,
        match=rf"refuses segment .*\(policy rule accept_segments\): its fingerprint "
        rf"{fingerprint(other)} is not among the 1 accepted",
    ):
        splitnn.SplitNN([other, top(17)], [alice, W("bob")])


def test_max_params():
    alice = W("alice", policy=WorkerPolicy(max_params=1000))
    with pytest.raises(PolicyError, match=r"\(policy rule max_params\): it holds 1,040 parameter"):
        splitnn.SplitNN([GOOD, top(16)], [alice, W("bob")])


def test_datasets_rule_guards_the_partys_own_datasets():
    alice = W("alice", policy=WorkerPolicy(datasets=("allowed",)))
    bob = W("bob")
    for name in ("allowed", "secret"):
        alice.add_dataset(name, features=DATA.features)
        bob.add_dataset(name, labels=DATA.labels)
    model = splitnn.SplitNN([GOOD, top(16)], [alice, bob])
    model.fit("allowed", epochs=1, batch_size=16, progress=False)
    with pytest.raises(PolicyError, match=r"refuses dataset 'secret' \(policy rule datasets\): models may read only"):
        model.fit("secret", epochs=1, batch_size=16, progress=False)


def test_only_adjacent_parties_may_pull_a_tensor():
    alice, bob, claire = W("alice", fuse=False), W("bob", fuse=False), W("claire", fuse=False)
    model = splitnn.SplitNN([GOOD, nn.Sequential(nn.Linear(16, 8), nn.ReLU()), top(8)], [alice, bob, claire])
    name, _ = model.prepare(DATA)
    activation = alice.forward(model.stages[0].key, BatchRef(name, torch.arange(4)))
    with pytest.raises(PolicyError, match=r"'claire' is not adjacent to 'alice' in the model .*\['bob'\]"):
        claire.forward(model.stages[2].key, activation)  # claire may not read what alice computed for bob
    bob.forward(model.stages[1].key, activation)  # bob may


def test_the_peers_rule_overrides_adjacency():
    alice, bob = W("alice", policy=WorkerPolicy(peers=("carol",)), fuse=False), W("bob", fuse=False)
    model = splitnn.SplitNN([GOOD, top(16)], [alice, bob])
    with pytest.raises(PolicyError, match=r"to hand its activation to 'bob' \(policy rule peers\)"):
        model.fit(DATA, epochs=1, batch_size=16, progress=False)


def test_release_outputs():
    alice, bob = W("alice"), W("bob", policy=WorkerPolicy(release_outputs=False))
    model = splitnn.SplitNN([GOOD, top(16)], [alice, bob])
    with pytest.raises(PolicyError, match="refuses to hand out activation"):
        model.predict(DATA.features[:2])


def test_the_audit_log_records_what_ran_and_what_was_read(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", "alice")
    alice, bob = W("alice", audit=log), W("bob")
    model = splitnn.SplitNN([GOOD, top(16)], [alice, bob])
    model.fit(DATA, epochs=2, batch_size=16, progress=False, checkpoint_dir=tmp_path / "ck")
    events = read_audit(tmp_path / "audit.jsonl")
    assert events[0]["event"] == "segment" and events[0]["fingerprint"] == fingerprint(GOOD)
    reads = [e for e in events if e["event"] == "dataset_read"]
    assert len(reads) == 1 and reads[0]["part"] == "features" and reads[0]["segment"] == model.stages[0].key
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [0, 4, 8]
    assert all(e["worker"] == "alice" and e["time"].endswith("+00:00") for e in events)


# -- a data holder's gate (closed defaults; networked attacks in test_gate_attacks.py) ---------------------
def closed(**rules) -> WorkerPolicy:
    return WorkerPolicy.from_dict(rules, data_holder=True)


def test_a_data_holders_defaults_are_closed_and_a_file_may_open_them(tmp_path):
    from splitnn.workers.policy import DATA_HOLDER_DEFAULTS

    policy = closed()
    assert (policy.release_outputs, policy.release_weights, policy.accept_any_segment) == (False, False, False)
    assert (policy.min_batch_size, policy.draw_rows, policy.gated) == (8, True, True)
    assert policy.to_dict() == dict(DATA_HOLDER_DEFAULTS)
    path = tmp_path / "p.toml"
    path.write_text("release_weights = true\nmin_batch_size = 16\n")
    opened = load_policy(path, data_holder=True)
    assert (opened.release_weights, opened.min_batch_size, opened.accept_any_segment) == (True, 16, False)
    assert load_policy(path).accept_any_segment is True  # a worker without data: the open defaults
    assert not WorkerPolicy().gated  # the in-process default stays open
    for text, match in (("min_batch_size = 0", "min_batch_size must be an integer"), ("draw_rows = 1", "true or")):
        path.write_text(text)
        with pytest.raises(ConfigurationError, match=match):
            load_policy(path, data_holder=True)


def test_pinned_compares_all_64_digits():
    fp = fingerprint(GOOD)
    near = fp[:16] + ("0" * 48 if fp[16:] != "0" * 48 else "1" * 48)
    assert WorkerPolicy(accept_segments=(fp,)).pinned(fp)
    assert not WorkerPolicy(accept_segments=(near,)).pinned(fp)
    assert not WorkerPolicy(accept_segments=(fp,)).pinned(fp[:16])
    alice = W("alice", policy=WorkerPolicy(accept_segments=(near,)))
    with pytest.raises(PolicyError, match=rf"\(policy rule accept_segments\): its fingerprint {fp} is not among"):
        alice.add_segment("good", GOOD, None)


@pytest.mark.parametrize("pipeline", [1, 2])
def test_a_closed_holder_trains_exactly_like_an_open_one(pipeline):
    pinned = closed(accept_segments=[fingerprint(GOOD)], release_weights=True)
    runs = []
    for policy in (None, pinned):
        torch.manual_seed(0)
        segments = [nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU()), top(16)]
        label_policy = closed(release_weights=True, release_outputs=True) if policy else None
        model = splitnn.SplitNN(segments, [W("alice", policy=policy), W("bob", policy=label_policy)])
        history = model.fit(DATA, epochs=2, batch_size=16, seed=4, progress=False, pipeline=pipeline)
        runs.append((history.losses(), model.evaluate(DATA, batch_size=16).loss, model.collect().state_dict()))
    (losses, ev, weights), (closed_losses, closed_ev, closed_weights) = runs
    assert losses == closed_losses and ev == closed_ev
    assert all(torch.equal(weights[k], closed_weights[k]) for k in weights)


def test_a_closed_holder_refuses_named_rows_weights_and_further_training():
    alice = W("alice", policy=closed(accept_any_segment=True, release_weights=False))
    alice.add_dataset("d", features=DATA.features)
    alice.add_segment("s", nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64, momentum=1.0)), None)
    with pytest.raises(PolicyError, match=r"\(policy rule draw_rows\)"):
        alice.forward("s", BatchRef("d", torch.tensor([3, 3])))
    alice.forward("s", BatchRef("d", epoch_batches(64, 8, seed=1)[0]))
    for read in (alice.get_state, alice.fetch_segment, alice.get_grads):
        with pytest.raises(PolicyError, match=r"\(policy rule release_weights\): state derived from"):
            read("s")
    with pytest.raises(PolicyError, match=r"\(policy rule release_weights\)"):
        alice.send_state("s", "bob")
    assert alice.probe("s", (2, 1, 8, 8)) == (2, 64)  # shapes only (computed on the meta device)


def test_named_rows_when_the_holder_lets_the_researcher_choose_still_need_distinct_rows():
    alice = W("alice", policy=closed(accept_any_segment=True, draw_rows=False))
    alice.add_dataset("d", features=DATA.features)
    alice.add_segment("s", GOOD, None)
    with pytest.raises(PolicyError, match=r"\(policy rule min_batch_size\): it names a row more than once"):
        alice.forward("s", BatchRef("d", torch.tensor([3, 3, 4, 5, 6, 7, 8, 9])))
    with pytest.raises(PolicyError, match=r"\(policy rule min_batch_size\): it holds 7 rows"):
        alice.forward("s", BatchRef("d", torch.arange(7)))
    alice.forward("s", BatchRef("d", torch.arange(8)))


def test_a_released_segment_is_frozen_and_replace_re_runs_the_checks():
    alice = W("alice", policy=closed(accept_any_segment=True, release_weights=True, refuse_passthrough=True))
    alice.add_dataset("d", features=DATA.features)
    alice.add_segment("s", GOOD, "sgd:lr=0.1")
    batches = epoch_batches(64, 8, seed=1)
    alice.forward("s", BatchRef("d", batches[0]))
    state = alice.get_state("s")  # the end
    with pytest.raises(PolicyError, match=r"\(policy rule release_weights\): its weights were released"):
        alice.forward("s", BatchRef("d", batches[1]))
    alice.forward("s", BatchRef("d", batches[1]), train=False)  # evaluation changes nothing
    assert all(torch.equal(v, alice.get_state("s")[k]) for k, v in state.items())
    alice.add_segment("s", nn.Identity(), None, replace=True)
    with pytest.raises(PolicyError, match=r"\(policy rule refuse_passthrough\)"):
        alice.forward("s", BatchRef("d", batches[2]), train=False)


def test_a_view_of_the_holders_data_is_its_own_and_holds_at_least_the_minimum():
    from splitnn.training.alignment import intersect

    ids = [f"P{i:04d}" for i in range(64)]
    alice = W("alice", policy=closed(accept_any_segment=True))
    bob = W("bob")
    alice.add_dataset("d", features=DATA.features, ids=ids)
    bob.add_dataset("d", labels=DATA.labels, ids=ids)
    alice.own_datasets = frozenset({"d"})  # as a networked session sees its party's --data
    with pytest.raises(PolicyError, match=r"refuses part 'd:tiny' of dataset 'd' \(policy rule min_batch_size\)"):
        intersect("d", [alice], bob, split={"big": 0.95, "tiny": 0.05})  # a part of 3 chosen rows
    alice.psi_cancel("d")
    bob.psi_cancel("d")
    few = W("carol")  # a party holding 3 of alice's ids: an intersection of rows someone chose
    few.add_dataset("d", labels=DATA.labels[:3], ids=ids[:3])
    with pytest.raises(PolicyError, match=r"refuses the intersection of dataset 'd' \(policy rule min_batch_size\)"):
        intersect("d", [alice], few)
    alice.psi_cancel("d")
    intersect("d", [alice], bob, split={"train": 0.5, "test": 0.5})
    assert {"d:train", "d:test"} <= alice.own_datasets  # the gate guards the views like the data
    alice.add_segment("s", GOOD, None)
    with pytest.raises(PolicyError, match=r"\(policy rule draw_rows\)"):
        alice.forward("s", BatchRef("d:train", torch.arange(8)))


def test_released_state_cannot_change_and_leave_again():
    from tests.workers.test_gate_attacks import out_buffer_graph

    alice = W("alice", policy=closed(accept_any_segment=True, release_weights=True))
    alice.add_dataset("d", features=DATA.features)
    alice.add_segment("copier", out_buffer_graph(), None)
    batches = epoch_batches(64, 8, seed=1)
    alice.forward("copier", BatchRef("d", batches[0]))
    first = alice.get_state("copier")  # released: the end
    alice.forward("copier", BatchRef("d", batches[1]), train=False)  # an evaluation writes the next rows
    with pytest.raises(PolicyError, match=r"\(policy rule release_weights\): it was released, and its state has"):
        alice.get_state("copier")
    alice.set_state("copier", first, src="researcher")  # the researcher's own values again: these may leave
    assert torch.equal(alice.get_state("copier")["stash"], first["stash"])
