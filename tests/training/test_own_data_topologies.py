"""The horizontal topologies over the data holders' own data, under a data holder's closed gate.

Real ``splitnn worker`` processes: ``alice`` and ``carol`` each hold their own shard's features
(``--data toy/<name>=...,parts=features``; the researcher never has them), ``bob`` every shard's labels.
Their policies are the data holder's defaults plus only what an operator must open for these topologies:
the bottom segment's fingerprint pinned (``accept_segments``) and ``release_weights = true`` (the turn-taking
hand-offs and SplitFed's averaging move the bottom's weights between parties). ``dave`` and ``erin`` pin the
segment but keep ``release_weights`` closed. The holders draw every batch's rows themselves (``draw_rows``),
training and evaluating: each run equals, ``torch.equal``, the same model on in-process workers with the
same policies and data (docs/many-holders.md, docs/splitfed.md: "Over the holders' own data").
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
import torch
from torch import nn

import splitnn
from splitnn.data.batching import draw_rows, epoch_batches
from splitnn.errors import PolicyError, WorkerError
from splitnn.training.topologies import MultiHolderSplitNN, SplitFedSplitNN
from splitnn.training.topologies.horizontal import SEED_STRIDE
from splitnn.wire.fingerprint import fingerprint
from splitnn.workers.policy import load_policy
from tests.training import own_data
from tests.transport.cluster import Cluster

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

TRUST = ("--trust", "tests.training.own_data")
SHARD = {"alice": "alice", "carol": "carol", "dave": "alice", "erin": "carol"}  # holder -> its shard's rows


def bottom() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())


def top() -> list[nn.Module]:
    return [nn.Sequential(nn.Linear(16, 10), nn.LogSoftmax(1))]


def doc_policies(page: str) -> tuple[str, str]:
    """The data holder's and the label holder's policy files as ``docs/<page>`` gives them ("Over the holders'
    own data"), with the bottom segment's fingerprint pinned."""
    section = (Path(__file__).parents[2] / "docs" / page).read_text().split("# Over the holders' own data", 1)[1]
    holder, labels = re.findall(r"```toml\n(.*?)```", section, re.S)[:2]
    return holder.replace("FINGERPRINT", fingerprint(bottom())), labels


POLICIES = {
    "holder": doc_policies("many-holders.md")[0],
    "shut": f'accept_segments = ["{fingerprint(bottom())}"]\n',  # closed otherwise: no weights leave
    "labels": doc_policies("many-holders.md")[1],
}


def test_the_docs_give_the_policies_these_tests_run():
    """many-holders.md and splitfed.md give the same policy lines, which pin the bottom and open release_weights
    and nothing else (the rest stays at the data holder's closed defaults)."""
    pages = [doc_policies(page) for page in ("many-holders.md", "splitfed.md")]
    assert [[tomllib.loads(t) for t in p] for p in pages[1:]] == [[tomllib.loads(t) for t in pages[0]]]
    holder, labels = (tomllib.loads(t) for t in pages[0])
    assert holder == {"accept_segments": [fingerprint(bottom())], "release_weights": True}
    assert labels == {"release_weights": True}


def _data(holder: str, parts: str) -> tuple[str, str]:
    return "--data", f"toy/{holder}=tests.training.own_data:{SHARD[holder]},parts={parts}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("own-data")
    for name, text in POLICIES.items():
        (root / f"{name}.toml").write_text(text)
    with Cluster(root, lifetime=300, open_data=False) as cl:
        for holder, policy in (("alice", "holder"), ("carol", "holder"), ("dave", "shut"), ("erin", "shut")):
            cl.start(holder, *_data(holder, "features"), *TRUST, "--policy", str(root / f"{policy}.toml"))
        labels = [a for holder in SHARD for a in _data(holder, "labels")]
        cl.start("bob", *labels, *TRUST, "--policy", str(root / "labels.toml"))
        cl.policies = {name: root / f"{name}.toml" for name in POLICIES}
        yield cl
        assert all(w.alive() for w in cl.workers.values()), "a worker died during the tests"


@pytest.fixture
def remote(cluster):
    """``remote(*names)``: researcher connections to the cluster's workers, closed (sessions ended) afterwards."""
    opened = []

    def open_(*names: str) -> list:
        ws = [splitnn.connect(cluster.workers[n].url, token=cluster.token, name=n, timeout=60) for n in names]
        opened.extend(ws)
        return ws

    yield open_
    for w in opened:
        w.close(end_session=True)


def twins(cluster, *holders: str) -> list[splitnn.VirtualWorker]:
    """In-process workers with the same policies and the same data as the holders and ``bob``."""
    policy = {"alice": "holder", "carol": "holder", "dave": "shut", "erin": "shut"}
    out = []
    for h in holders:
        w = splitnn.VirtualWorker(h, policy=load_policy(cluster.policies[policy[h]], data_holder=True))
        w.add_dataset(f"toy/{h}", features=getattr(own_data, SHARD[h])().features)
        out.append(w)
    bob = splitnn.VirtualWorker("bob", policy=load_policy(cluster.policies["labels"], data_holder=True))
    for h in holders:
        bob.add_dataset(f"toy/{h}", labels=getattr(own_data, SHARD[h])().labels)
    return [*out, bob]


MODELS = {
    "multi peer": lambda ws: MultiHolderSplitNN(bottom(), top(), ws[:2], ws[2], turn_batches=2),
    "multi central": lambda ws: MultiHolderSplitNN(bottom(), top(), ws[:2], ws[2], handoff="central"),
    "splitfed v1": lambda ws: SplitFedSplitNN(bottom(), top(), ws[:2], ws[2], variant="v1"),
    "splitfed v2": lambda ws: SplitFedSplitNN(bottom(), top(), ws[:2], ws[2], variant="v2", round_batches=2),
}


def _states(model) -> list[dict[str, torch.Tensor]]:
    """Every holder's chain's weights (bottom and top), as the researcher collects them."""
    return [
        stage.worker.fetch_segment(stage.key).state_dict()
        for h in range(len(model.holders))
        for stage in model.stages_of(h)
    ]


@pytest.mark.parametrize("kind", list(MODELS))
def test_closed_holders_own_data_trains_exactly_like_in_process_workers(cluster, remote, kind):
    """The researcher names the dataset only ("toy"): shard sizes come from the holders' dataset_stats, every
    batch goes out as a draw the holder turns into rows of its own shard (min_batch_size checked there)."""
    torch.manual_seed(0)
    model = MODELS[kind](remote("alice", "carol", "bob"))
    torch.manual_seed(0)
    twin = MODELS[kind](twins(cluster, "alice", "carol"))
    fit = dict(epochs=2, batch_size=8, seed=5, progress=False)
    history, twin_history = model.fit("toy", **fit), twin.fit("toy", **fit)
    assert history.losses() == twin_history.losses()
    assert model.ledger.total(kind="activation") > 0
    result, twin_result = model.evaluate("toy", batch_size=16), twin.evaluate("toy", batch_size=16)
    assert (result.loss, result.accuracy) == (twin_result.loss, twin_result.accuracy)
    assert result.count == sum(own_data.SIZES.values())
    assert model.ledger.links() == twin.ledger.links()
    ours, theirs = _states(model), _states(twin)
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- what the gate closes: the refusal names the rule and the policy lines that open it --------------------
SHUT = {
    "multi peer": r"turn-taking hands the bottom segment's weights",
    "multi central": r"turn-taking hands the bottom segment's weights through the weight store",
    "splitfed v1": r"SplitFed sends every data holder's bottom segment to the aggregator",
}
FIX = r".*`release_weights = true` in its policy"


@pytest.mark.parametrize("kind", list(SHUT))
def test_holders_that_keep_their_weights_are_refused_naming_the_rule_and_the_fix(cluster, remote, kind):
    """dave and erin pinned the segment but release no weights: asked before training (may_release_weights), a
    worker process refuses the transfers of the bottom (rule release_weights), and the topology's message says
    which policy line opens it and what it releases; no batch ran, nothing of the weights left, and the workers
    live on."""
    model = MODELS[kind](remote("dave", "erin", "bob"))
    match = rf"worker '(dave|erin)' refuses .*\(policy rule release_weights\).*{SHUT[kind]}{FIX}"
    with pytest.raises(PolicyError, match=match):
        model.fit("toy", epochs=1, batch_size=8, progress=False)
    assert model.ledger.total(src="dave", kind="weights") == model.ledger.total(src="erin", kind="weights") == 0
    assert model.ledger.total(kind="activation") == 0  # refused before the first batch
    (fresh,) = remote("dave")
    assert fresh.dataset_stats("toy/dave").size == own_data.SIZES["alice"]  # alive, and a new session works


@pytest.mark.parametrize("kind", list(SHUT))
def test_in_process_holders_that_keep_their_weights_are_refused_before_training(cluster, kind):
    """Where the researcher's process can read a holder's policy (in-process workers), the refusal comes before
    the first batch."""
    model = MODELS[kind](twins(cluster, "dave", "erin"))
    match = rf"worker 'dave' refuses .*\(policy rule release_weights\).*{SHUT[kind]}{FIX}"
    with pytest.raises(PolicyError, match=match):
        model.fit("toy", epochs=1, batch_size=8, progress=False)
    assert model.ledger.total() == 0  # no batch ran, nothing moved


def test_a_peers_rule_without_the_next_holder_is_refused_before_training(cluster):
    """A holder whose ``peers`` rule names only the label holder cannot hand its weights to the next holder."""
    ws = twins(cluster, "alice", "carol")
    strict = load_policy(cluster.policies["holder"], data_holder=True)
    ws[0] = splitnn.VirtualWorker("alice", policy=type(strict)(**{**strict.__dict__, "peers": ("bob",)}))
    ws[0].add_dataset("toy/alice", features=own_data.alice().features)
    model = MODELS["multi peer"](ws)
    with pytest.raises(PolicyError, match=rf"worker 'alice' refuses .*\(policy rule peers\).*{FIX}"):
        model.fit("toy", epochs=1, batch_size=8, progress=False)
    assert model.ledger.total() == 0


def test_every_batch_is_a_draw_of_its_holders_shard(cluster):
    """The plans the researcher sends: training batch ``j`` of holder ``h`` carries the draw
    ``BatchDraw(seed + 7919 h, epoch, j, batch_size)`` of its shard, and an evaluation's batches stay within a
    shard, each the unshuffled draw of its rows; the rows are those the holder re-derives from the draw."""
    for kind in ("multi peer", "splitfed v2"):
        model = MODELS[kind](twins(cluster, "alice", "carol"))
        name, n = model.prepare("toy")
        sizes = [own_data.SIZES["alice"], own_data.SIZES["carol"]]
        plan = model.epoch_plan(name, n, 8, seed=5, epoch=1)
        assert len(plan) == sum(s // 8 for s in sizes)
        for idx in plan:
            h, local = model._shards.one_holder(name, idx)
            d = local.draw
            assert (d.seed, d.epoch, d.batch_size, d.shuffle) == (5 + SEED_STRIDE * h, 1, 8, True)
            assert torch.equal(local, draw_rows(sizes[h], d))
        evals = model.eval_plan(name, n, 16)
        for idx in evals:
            h, local = model._shards.one_holder(name, idx)  # within one shard
            assert not local.draw.shuffle and torch.equal(local, draw_rows(sizes[h], local.draw))
        assert torch.equal(torch.cat(evals), torch.arange(n))
        # a batch the plans did not make (here an unshuffled draw over the whole numbering, rows 48..55: carol's
        # first 8) is not a draw of carol's shard (position 6 of it does not exist): it names its rows
        other = epoch_batches(n, 8, shuffle=False)[6]
        assert other.draw is not None
        h, local = model._shards.one_holder(name, other)
        assert h == 1 and torch.equal(local, torch.arange(8)) and getattr(local, "draw", None) is None


def test_a_short_last_batch_of_a_shard_is_refused_by_its_holder(cluster, remote):
    """carol's 40 rows in batches of 12 leave a last batch of 4, fewer than a data holder's min_batch_size (8)."""
    model = MODELS["splitfed v1"](remote("alice", "carol", "bob"))
    with pytest.raises(WorkerError, match=r"worker 'carol' refuses .*\(policy rule min_batch_size\).*short last batch"):
        model.fit("toy", epochs=1, batch_size=12, progress=False)
    assert model.ledger.total(src="carol", kind="activation") == 0  # refused at its first batch, before any work
