"""Defenses change only what leaves a party: at strength 0 training is bit-identical to undefended training."""

from __future__ import annotations

import pytest
import torch

import splitnn
from splitnn.models import tutorial_mlp
from splitnn.privacy import DefenseSetting, PrivacyConfig, build_defended_model, train_defended

CONFIG = dict(train_size=600, victims=10, epochs=2, batch_size=32, lr=0.05, seed=3, clip=2.0)


def _undefended(data, config: PrivacyConfig, fuse: bool) -> list[torch.Tensor]:
    """Plain SplitNN.fit on the same topology: no defense, no tap, no privacy code at all."""
    torch.manual_seed(config.seed)
    workers = {n: splitnn.VirtualWorker(n, fuse=fuse) for n in dict.fromkeys(config.workers)}
    model = splitnn.SplitNN(
        tutorial_mlp(config.hidden), [workers[n] for n in config.workers], optimizer=f"sgd:lr={config.lr}"
    )
    model.fit(data, epochs=config.epochs, batch_size=config.batch_size, seed=config.seed, progress=False)
    return list(model.collect().parameters())


def _defended(data, config: PrivacyConfig, setting: DefenseSetting, fuse: bool) -> list[torch.Tensor]:
    defended = build_defended_model(config, setting, 10, 784, fuse=fuse)
    rng = torch.get_rng_state()
    train_defended(defended, data, config)
    assert torch.equal(torch.get_rng_state(), rng), "a defense drew from the global RNG"
    return list(defended.model.collect().parameters())


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    assert [t.shape for t in a] == [t.shape for t in b]
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("workers", [("alice", "bob", "bob"), ("alice", "bob", "claire")], ids=["2-party", "3-party"])
@pytest.mark.parametrize("defense", ["nopeek", "noise", "label"])
def test_strength_zero_reproduces_undefended_training_exactly(fmnist_small, defense, workers, fuse):
    config = PrivacyConfig(workers=workers, **CONFIG)
    reference = _undefended(fmnist_small, config, fuse)
    assert _same(_defended(fmnist_small, config, DefenseSetting(defense, 0.0), fuse), reference)
    # The oracle can fail: the same defense at a positive strength does change the weights.
    assert not _same(_defended(fmnist_small, config, DefenseSetting(defense, 0.5), fuse), reference)


def test_the_tap_records_exactly_what_crosses_the_cut(fmnist_small):
    """Oracle: the first step's activation and cut gradient recomputed on a monolithic copy of the initial model."""
    config = PrivacyConfig(workers=("alice", "bob", "bob"), **CONFIG)
    torch.manual_seed(config.seed)
    bottom, *top = tutorial_mlp(config.hidden)
    defended = build_defended_model(config, DefenseSetting("none"), 10, 784, fuse=False)
    seen = []
    train_defended(defended, fmnist_small, config, lambda e, idx, a, g: seen.append((idx, a, g)))
    assert len(seen) == config.epochs * -(-600 // config.batch_size)
    idx, act, grad = seen[0]
    x, y = fmnist_small.features[idx], fmnist_small.labels[idx]
    a = bottom(x).detach().requires_grad_(True)
    torch.nn.functional.nll_loss(torch.nn.Sequential(*top)(a), y).backward()
    assert torch.equal(act, a.detach()) and torch.equal(grad, a.grad)
    # and these are the bytes the ledger says crossed the cut
    assert defended.model.ledger.total(src="alice", dst="bob", kind="activation") == 2 * 600 * 128 * 4
    assert defended.model.ledger.total(src="bob", dst="alice", kind="gradient") == 2 * 600 * 128 * 4
