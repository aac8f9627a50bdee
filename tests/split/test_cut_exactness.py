"""Exactness oracles for splitnn.cut in-process: a model cut into segments on three VirtualWorkers trains to
exactly the weights of the same model trained unsplit (the twin: a plain PyTorch loop below), with momentum SGD
and with Adam, fused and eager -- including cuts that several values cross -- and the ledger counts each value."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import splitnn
from splitnn.training import epoch_batches
from tests.cut_models import Gated, Masked, SkipTwo, SmallResNet
from tests.helpers import toy_dataset

NAMES = ("alice", "bob", "claire")
EPOCHS, BATCH, SEED = 2, 16, 3

OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
}

CASES = {  # model, cut points, data shape
    "resnet-blocks": (lambda: SmallResNet(width=4), ["layer1", "layer2"], (1, 12, 12)),
    "resnet-inside-blocks": (lambda: SmallResNet(width=4), ["layer1.1.conv2", "layer2.0.bn1"], (1, 12, 12)),
    "skip-over-two-cuts": (SkipTwo, ["mid", "head"], (20,)),
}


def train_twin(model, data, make_opt):
    """The unsplit model, trained by hand in fit's data order."""
    model = copy.deepcopy(model)
    opt = make_opt(model.parameters())
    for epoch in range(EPOCHS):
        for idx in epoch_batches(len(data), BATCH, seed=SEED, epoch=epoch):
            opt.zero_grad()
            F.nll_loss(model(data.features[idx]), data.labels[idx]).backward()
            opt.step()
    return model


def assert_same_state(got: dict, want: dict) -> None:
    assert list(got) == list(want) or sorted(got) == sorted(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), f"{name} differs by {(got[name] - value).abs().max().item():.3g}"


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(CASES))
def test_split_training_equals_the_unsplit_model(case, opt):
    make_model, at, shape = CASES[case]
    torch.manual_seed(0)
    model = make_model()
    data = toy_dataset(64, shape=shape, seed=1)
    twin = train_twin(model, data, OPTIMIZERS[opt])
    ledgers = []
    for fuse in (True, False):
        workers = [splitnn.VirtualWorker(n, fuse=fuse) for n in NAMES]
        split = splitnn.SplitNN(splitnn.cut(model, at=at), workers, optimizer=OPTIMIZERS[opt])
        split.fit(data, epochs=EPOCHS, batch_size=BATCH, seed=SEED, progress=False)
        ledgers.append(split.ledger.snapshot())
        assert_same_state(split.collect_state(), twin.state_dict())
        collected = split.collect()  # one module, with the original names
        assert_same_state(collected.state_dict(), twin.state_dict())
    fused, eager = ledgers
    assert [l for l in fused.links() if l.kind in ("activation", "gradient")] == [
        l for l in eager.links() if l.kind in ("activation", "gradient")
    ]
    # one record per crossing of a cut, whatever the number of values; bytes: every value that crosses
    segs = splitnn.cut(model, at=at)
    with torch.no_grad():
        first = segs[0](data.features)
    values = first if isinstance(first, tuple) else (first,)
    batches = EPOCHS * len(epoch_batches(len(data), BATCH, seed=SEED))
    assert eager.count(src="alice", dst="bob", kind="activation") == batches
    assert eager.total(src="alice", dst="bob", kind="activation") == EPOCHS * sum(t.nbytes for t in values)
    assert eager.total(src="bob", dst="alice", kind="gradient") == EPOCHS * sum(t.nbytes for t in values)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
def test_low_level_loop_with_two_inputs_and_a_value_without_gradient(fuse):
    """The tutorial's loop on a model with two inputs (features and a mask): the first segment takes a tuple;
    at the cut an int64 index crosses forward only (no gradient bytes), next to a float activation."""
    torch.manual_seed(0)
    model = Masked()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    split = splitnn.SplitNN(
        splitnn.cut(model, at=["table"]),
        [splitnn.VirtualWorker(n, fuse=fuse) for n in NAMES[:2]],
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    )
    g = torch.Generator().manual_seed(2)
    steps, n = 4, 8
    for _ in range(steps):
        x, mask = torch.randn(n, 20, generator=g), (torch.rand(n, 16, generator=g) > 0.3).float()
        y = torch.randint(0, 10, (n,), generator=g)
        split.zero_grads()
        out = split.forward((x, mask))
        F.nll_loss(out, y).backward()
        split.backward()
        split.step()
        twin_opt.zero_grad()
        F.nll_loss(twin(x, mask), y).backward()
        twin_opt.step()
    assert_same_state(split.collect_state(), twin.state_dict())
    h_bytes, bucket_bytes = n * 16 * 4, n * 8
    ledger = split.ledger
    assert ledger.total(src="researcher", dst="alice", kind="features") == steps * (n * 20 * 4 + n * 16 * 4)
    assert ledger.total(src="alice", dst="bob", kind="activation") == steps * (h_bytes + bucket_bytes)
    assert ledger.total(src="bob", dst="alice", kind="gradient") == steps * h_bytes  # the index needs none
    assert ledger.count(src="bob", dst="alice", kind="gradient") == steps


def test_predict_and_evaluate_with_several_values_at_a_cut():
    torch.manual_seed(0)
    model = SmallResNet(width=4).eval()
    split = splitnn.SplitNN(
        splitnn.cut(model, at=["layer1.1.conv2", "layer2.0.bn1"]), [splitnn.VirtualWorker(n) for n in NAMES]
    )
    data = toy_dataset(40, shape=(1, 12, 12), seed=4)
    assert torch.equal(split.predict(data.features), model(data.features))
    result = split.evaluate(data)
    want = (model(data.features).argmax(1) == data.labels).float().mean().item()
    assert result.accuracy == pytest.approx(want)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
def test_values_that_need_no_gradient_cross_forward_only(fuse):
    """Gated: a mask made from the data and an integer index cross the first cut beside the activation; the
    gradient that comes back is (g, None, None) and the model trains as unsplit."""
    torch.manual_seed(0)
    model = Gated()
    data = toy_dataset(64, shape=(20,), seed=1)
    twin = train_twin(model, data, OPTIMIZERS["adam"])
    workers = [splitnn.VirtualWorker(n, fuse=fuse) for n in NAMES]
    split = splitnn.SplitNN(splitnn.cut(model, at=["mid", "head"]), workers, optimizer=OPTIMIZERS["adam"])
    split.fit(data, epochs=EPOCHS, batch_size=BATCH, seed=SEED, progress=False)
    assert_same_state(split.collect_state(), twin.state_dict())
    steps = EPOCHS * len(data) // BATCH
    assert split.ledger.total(src="alice", dst="bob", kind="activation") == steps * BATCH * (16 * 4 * 2 + 8)
    assert split.ledger.total(src="bob", dst="alice", kind="gradient") == steps * BATCH * 16 * 4
