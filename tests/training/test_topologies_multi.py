"""Many data holders, one label holder: exactness, hand-off ledger, validation, real data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import splitnn
from splitnn.data import dirichlet_shards, iid_shards, load_dataset
from splitnn.errors import ConfigurationError
from splitnn.models import tutorial_mlp
from splitnn.training.topologies import MultiHolderSplitNN
from tests.helpers import assert_same_weights, toy_dataset

W = splitnn.VirtualWorker
# The bottom segment of the tutorial's MLP, Linear(784, 128): weights and bias in float32.
BOTTOM_STATE_BYTES = (784 * 128 + 128) * 4


def _multi(k: int, *, fuse: bool = True, init=None, **kwargs) -> tuple[MultiHolderSplitNN, list[nn.Module]]:
    segments = init if init is not None else tutorial_mlp()
    initial = copy.deepcopy(segments)
    holders = [W(f"alice{i + 1}", fuse=fuse) for i in range(k)]
    model = MultiHolderSplitNN(segments[0], segments[1:], holders, W("bob", fuse=fuse), **kwargs)
    return model, initial


def _weights_links(ledger) -> dict[tuple[str, str], tuple[int, int]]:
    return {(l.src, l.dst): (l.count, l.nbytes) for l in ledger.links() if l.kind == "weights"}


# -- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
def test_one_holder_reproduces_plain_chain_training_exactly(fuse):
    torch.manual_seed(0)
    segments = tutorial_mlp()
    chain_segments = copy.deepcopy(segments)
    data = toy_dataset(200)
    chain = splitnn.SplitNN(chain_segments, [W("alice", fuse=fuse), W("bob", fuse=fuse), W("claire", fuse=fuse)])
    chain.fit(data, epochs=2, batch_size=32, seed=7, progress=False)
    multi = MultiHolderSplitNN(
        segments[0], segments[1:], [W("alice", fuse=fuse)], [W("bob", fuse=fuse), W("claire", fuse=fuse)]
    )
    multi.fit(data, epochs=2, batch_size=32, seed=7, progress=False)
    assert_same_weights(multi.collect(), chain.collect())
    assert multi.handoffs == []
    assert multi.ledger.total(kind="weights", dst="alice") == 0


def _train_in_plan_order(initial, data, model, *, epochs, batch_size, seed, lr=0.03) -> nn.Sequential:
    """A monolithic twin trained on the same batches, mapped back to the original sample indices."""
    shards = [s.sort().values for s in iid_shards(len(data), len(model.holders), 0)]
    original = torch.cat(shards)  # shard-after-shard numbering -> original row
    twin = nn.Sequential(*copy.deepcopy(initial))
    opt = torch.optim.SGD(twin.parameters(), lr=lr)
    name, n = model.prepare(data)
    for epoch in range(epochs):
        for batch in model.epoch_plan(name, n, batch_size, shuffle=True, seed=seed, epoch=epoch):
            rows = original[batch]
            opt.zero_grad()
            nn.NLLLoss()(twin(data.features[rows]), data.labels[rows]).backward()
            opt.step()
    return twin


@pytest.mark.parametrize("handoff", ["peer", "central"])
@pytest.mark.parametrize("turn_batches", [None, 2])
def test_three_holders_equal_sgd_over_their_turns(handoff, turn_batches):
    """The hand-offs move the exact weights: K=3 equals one network trained in the turns' order."""
    torch.manual_seed(1)
    data = toy_dataset(150, seed=2)
    model, initial = _multi(3, handoff=handoff, turn_batches=turn_batches)
    model.fit(data, epochs=2, batch_size=16, seed=5, progress=False)
    twin = _train_in_plan_order(initial, data, model, epochs=2, batch_size=16, seed=5)
    assert_same_weights(model.collect(), twin)


def test_epoch_plan_round_robin_turns_cover_every_sample_once():
    data = toy_dataset(96)
    model, _ = _multi(3, turn_batches=2)
    name, n = model.prepare(data)
    plan = model.epoch_plan(name, n, 8, seed=0, epoch=0)
    owners = [int(b[0]) // 32 for b in plan]  # 32 samples per holder, numbered shard after shard
    assert owners == [0, 0, 1, 1, 2, 2] * 2
    assert all(len({int(i) // 32 for i in b}) == 1 for b in plan)
    assert torch.equal(torch.cat(plan).sort().values, torch.arange(96))
    per_epoch, _ = _multi(3)  # default: one turn per holder per epoch
    pname, _ = per_epoch.prepare(data)
    assert [int(b[0]) // 32 for b in per_epoch.epoch_plan(pname, 96, 8)] == [0] * 4 + [1] * 4 + [2] * 4


# -- the ledger --------------------------------------------------------------------------------
def test_peer_handoffs_go_holder_to_holder_with_the_bottom_state():
    torch.manual_seed(2)
    model, _ = _multi(3, handoff="peer")
    model.fit(toy_dataset(96), epochs=1, batch_size=16, progress=False)
    assert _weights_links(model.ledger) == {
        ("alice1", "alice2"): (1, BOTTOM_STATE_BYTES),
        ("alice2", "alice3"): (1, BOTTOM_STATE_BYTES),
    }
    assert [(h.src, h.dst, h.reason) for h in model.handoffs] == [
        ("alice1", "alice2", "turn"),
        ("alice2", "alice3", "turn"),
    ]


def test_central_handoffs_go_through_the_store_at_the_label_holder():
    torch.manual_seed(3)
    model, _ = _multi(3, handoff="central")
    model.fit(toy_dataset(96), epochs=1, batch_size=16, progress=False)
    assert _weights_links(model.ledger) == {
        ("alice1", "bob"): (1, BOTTOM_STATE_BYTES),
        ("bob", "alice2"): (1, BOTTOM_STATE_BYTES),
        ("alice2", "bob"): (1, BOTTOM_STATE_BYTES),
        ("bob", "alice3"): (1, BOTTOM_STATE_BYTES),
    }


def test_central_handoffs_through_a_third_party_store():
    torch.manual_seed(4)
    segments = tutorial_mlp()
    holders = [W("h1"), W("h2")]
    model = MultiHolderSplitNN(segments[0], segments[1:], holders, W("bob"), handoff="central", store=W("vault"))
    model.fit(toy_dataset(64), epochs=2, batch_size=16, progress=False)
    # epoch 1: h1 -> vault -> h2; epoch 2: h2 -> vault -> h1, then h1 -> vault -> h2
    assert _weights_links(model.ledger) == {
        ("h1", "vault"): (2, 2 * BOTTOM_STATE_BYTES),
        ("vault", "h2"): (2, 2 * BOTTOM_STATE_BYTES),
        ("h2", "vault"): (1, BOTTOM_STATE_BYTES),
        ("vault", "h1"): (1, BOTTOM_STATE_BYTES),
    }
    assert "vault" in model.parties()
    assert model.ledger.total(src="vault", kind="activation") == 0


def test_turns_of_n_batches_hand_off_at_every_turn_change():
    torch.manual_seed(5)
    model, _ = _multi(3, handoff="peer", turn_batches=2)
    model.fit(toy_dataset(96), epochs=1, batch_size=8, progress=False)  # 4 batches per holder: 2 rounds
    assert _weights_links(model.ledger) == {
        ("alice1", "alice2"): (2, 2 * BOTTOM_STATE_BYTES),
        ("alice2", "alice3"): (2, 2 * BOTTOM_STATE_BYTES),
        ("alice3", "alice1"): (1, BOTTOM_STATE_BYTES),
    }


def test_evaluation_brings_stale_holders_up_to_date_and_scores_the_latest_model():
    torch.manual_seed(6)
    train, test = toy_dataset(96), toy_dataset(60, seed=9)
    model, _ = _multi(3, handoff="peer")
    model.fit(train, epochs=1, batch_size=16, progress=False)
    result = model.evaluate(test)
    syncs = [(h.src, h.dst) for h in model.handoffs if h.reason == "evaluate"]
    assert syncs == [("alice3", "alice1"), ("alice3", "alice2")]
    net = model.collect()
    with torch.no_grad():
        expected = (net(test.features).argmax(1) == test.labels).float().mean().item()
    assert result.accuracy == pytest.approx(expected)
    assert model.ledger.total(kind="labels") == 0


def test_features_stay_at_their_holder_and_labels_at_the_label_holder():
    torch.manual_seed(7)
    data = toy_dataset(90)
    model, _ = _multi(3, partition="dirichlet:0.5", partition_seed=3)
    name, n = model.prepare(data)
    shards = dirichlet_shards(data.labels, 3, 0.5, 3)
    for h, (holder, shard) in enumerate(zip(model.holders, shards)):
        stats = holder.dataset_stats(model.shard_name(name, h))
        assert stats.size == len(shard) and stats.num_labels is None  # features only
        assert model.label_holder.dataset_stats(model.shard_name(name, h)).feature_shape is None  # labels only
    model.fit(data, epochs=1, batch_size=16, progress=False)
    for holder in model.holders:
        assert model.ledger.total(dst=holder.name, kind="activation") == 0
        assert model.ledger.total(src=holder.name, kind="features") == 0


def test_datasets_placed_at_the_holders_beforehand_are_used_by_name():
    torch.manual_seed(8)
    data = toy_dataset(40)
    model, _ = _multi(2)
    for h, rows in enumerate((slice(0, 25), slice(25, 40))):
        name = f"clinic/{model.holders[h].name}"
        model.holders[h].add_dataset(name, features=data.features[rows])
        model.label_holder.add_dataset(name, labels=data.labels[rows])
    assert model.prepare("clinic") == ("clinic", 40)
    history = model.fit("clinic", epochs=1, batch_size=10, progress=False)
    assert history.final.samples == 40
    assert [(h.src, h.dst) for h in model.handoffs] == [("alice1", "alice2")]


# -- refused before training ------------------------------------------------------------------
def test_more_holders_than_samples_is_refused_before_training():
    model, initial = _multi(5)
    with pytest.raises(ConfigurationError, match="5 data holders but the dataset has only 4 samples"):
        model.fit(toy_dataset(4), epochs=1, progress=False)
    assert model.ledger.total() == 0
    assert torch.equal(model.collect()[1].weight, initial[0][1].weight)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(handoff="broadcast"), "unknown handoff"),
        (dict(store=W("vault")), "only with handoff='central'"),
        (dict(turn_batches=0), "turn_batches"),
        (dict(partition="zipf"), "unknown partition"),
        (dict(loss="hinge"), "unknown loss"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    segments = tutorial_mlp()
    with pytest.raises(ConfigurationError, match=match):
        MultiHolderSplitNN(segments[0], segments[1:], [W("a1"), W("a2")], W("bob"), **kwargs)


def test_bad_arrangements_are_refused():
    s = tutorial_mlp()
    a1, a2, bob = W("a1"), W("a2"), W("bob")
    with pytest.raises(ConfigurationError, match="distinct"):
        MultiHolderSplitNN(s[0], s[1:], [a1, a1], bob)
    with pytest.raises(ConfigurationError, match="both a data holder and a top worker"):
        MultiHolderSplitNN(s[0], s[1:], [a1, a2], [bob, a2])
    with pytest.raises(ConfigurationError, match="is a data holder"):
        MultiHolderSplitNN(s[0], s[1:], [a1, a2], bob, handoff="central", store=a2)
    with pytest.raises(ConfigurationError, match="at least one top segment"):
        MultiHolderSplitNN(s[0], [], [a1, a2], bob)
    with pytest.raises(splitnn.ShapeMismatchError):
        MultiHolderSplitNN(nn.Linear(784, 64), s[1:], [a1, a2], bob)


def test_a_batch_spanning_holders_is_refused():
    model, _ = _multi(2)
    name, _ = model.prepare(toy_dataset(20))
    with pytest.raises(ConfigurationError, match="spans holders"):
        model.train_batch(name, torch.tensor([0, 19]))


# -- real data ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_three_iid_holders_match_one_holder_on_fashion_mnist(shared_data):
    """Same init, same budget (1 epoch of the full training set, SGD lr 0.005, batch 32)."""
    root = shared_data / "fashion-mnist"
    train = load_dataset("fashion-mnist", "train", data_dir=root, download=False)
    test = load_dataset("fashion-mnist", "test", data_dir=root, download=False)
    torch.manual_seed(0)
    segments = tutorial_mlp()
    chain = splitnn.SplitNN(copy.deepcopy(segments), [W("alice"), W("bob"), W("claire")], optimizer="sgd:lr=0.005")
    chain.fit(train, epochs=1, batch_size=32, progress=False)
    single = chain.evaluate(test).accuracy
    multi = MultiHolderSplitNN(
        segments[0],
        segments[1:],
        [W("alice1"), W("alice2"), W("alice3")],
        [W("bob"), W("claire")],
        optimizer="sgd:lr=0.005",
    )
    multi.fit(train, epochs=1, batch_size=32, progress=False)
    three = multi.evaluate(test).accuracy
    print(f"fashion-mnist, 1 epoch: one holder {single:.4f}, three IID holders {three:.4f}")
    assert single > 0.77 and three > 0.77  # both actually learned
    assert abs(three - single) <= 0.01, (single, three)
    assert len([h for h in multi.handoffs if h.reason == "turn"]) == 2
