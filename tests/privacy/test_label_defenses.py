"""Label DP, Marvell and MID: each against a plainly written oracle, and against the norm attack on a binary task."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import MultivariateNormal, kl_divergence

from splitnn.data import Dataset
from splitnn.errors import ConfigurationError
from splitnn.privacy import DefenseSetting, LabelLeakageAttack, PrivacyConfig, build_defended_model, train_defended
from splitnn.privacy.defenses import LabelDP, Marvell, MIDLayer, randomized_response
from splitnn.privacy.defenses._rng import SeededStream
from splitnn.privacy.defenses.marvell import _sym_kl, marvell_noise, optimal_marvell_covariances


# ----------------------------------------------------------------------------- label DP
@pytest.mark.parametrize("epsilon, k", [(1.0, 2), (2.0, 10)])
def test_randomized_response_keeps_with_the_textbook_probability_and_spreads_uniformly(epsilon, k):
    n = 200_000
    y = torch.arange(n) % k
    out = randomized_response(y, epsilon, k, torch.Generator().manual_seed(0))
    keep = math.exp(epsilon) / (math.exp(epsilon) + k - 1)
    sd = math.sqrt(keep * (1 - keep) / n)
    assert abs(float((out == y).double().mean()) - keep) < 5 * sd
    # a flipped label of class 0 lands on each other class equally often
    flipped = out[(y == 0) & (out != y)]
    counts = torch.bincount(flipped, minlength=k)[1:].double()
    expected = flipped.numel() / (k - 1)
    assert float((counts - expected).abs().max()) < 5 * math.sqrt(expected) + 1
    assert int(out.min()) >= 0 and int(out.max()) < k


def test_label_dp_changes_labels_only_and_refuses_bad_budgets():
    d = Dataset(torch.randn(50, 3), torch.arange(50) % 2, "toy", 2)
    noisy = LabelDP(0.5, seed=1).apply(d)
    assert noisy.features is d.features and noisy.num_classes == 2
    assert torch.equal(noisy.labels, LabelDP(0.5, seed=1).apply(d).labels)  # reproducible from the seed
    assert not torch.equal(noisy.labels, d.labels)
    with pytest.raises(ConfigurationError, match="epsilon"):
        LabelDP(0.0)
    with pytest.raises(ConfigurationError, match="privacy budget"):
        DefenseSetting("label-dp", 0)


# ----------------------------------------------------------------------------- Marvell
def _full_cov(s: float, u: float, v: float, e: torch.Tensor) -> torch.Tensor:
    d = e.numel()
    return s * torch.eye(d, dtype=torch.float64) + u * torch.outer(e, e) + v * (torch.eye(d) - torch.outer(e, e))


def test_marvell_objective_is_the_symmetric_kl_of_the_two_gaussians():
    d = 5
    e = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    e = e / e.norm()
    m1, m0 = 0.7 * e, torch.zeros(d, dtype=torch.float64)
    x = (0.3, 0.1, 0.05, 0.2)
    p1 = MultivariateNormal(m1, _full_cov(0.4, x[0], x[2], e))
    p0 = MultivariateNormal(m0, _full_cov(0.2, x[1], x[3], e))
    direct = float(kl_divergence(p1, p0) + kl_divergence(p0, p1))
    assert _sym_kl(x, 0.4, 0.2, 0.49, d) == pytest.approx(direct, rel=1e-9)


def test_marvell_solution_respects_the_budget_and_beats_simple_allocations():
    s1, s0, delta2, p, d, power = 0.02, 0.01, 1.0, 0.1, 20, 2.0
    u1, u0, v1, v0 = optimal_marvell_covariances(s1, s0, delta2, p, d, power)
    assert p * (u1 + (d - 1) * v1) + (1 - p) * (u0 + (d - 1) * v0) <= power * (1 + 1e-6)
    best = _sym_kl((u1, u0, v1, v0), s1, s0, delta2, d)
    for alt in [(power, power, 0, 0), (power / d, power / d, power / d, power / d), (0, 0, 0, 0)]:
        assert best <= _sym_kl(alt, s1, s0, delta2, d) + 1e-9
    assert best < 0.5 * _sym_kl((0, 0, 0, 0), s1, s0, delta2, d)


def test_marvell_strength_zero_is_the_identity_and_noise_is_zero_mean():
    g = torch.randn(64, 8)
    y = (torch.arange(64) % 8 == 0).long()
    layer = Marvell(0.0)
    x = torch.randn(64, 8, requires_grad=True)
    assert layer(x) is x
    noisy = torch.stack([marvell_noise(g, y, 4.0, SeededStream(i)) for i in range(400)])
    # mean of the perturbed gradients is the true gradient (unbiased updates): 400 draws, std/20 tolerance
    err = (noisy.mean(dim=0) - g).abs().max()
    assert float(err) < 5 * float(noisy.std(dim=0).max()) / 20


def test_marvell_needs_its_loss_and_binary_labels():
    layer = Marvell(1.0)
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ConfigurationError, match="marvell.loss"):
        layer(x).sum().backward()
    with pytest.raises(ConfigurationError, match="binary tasks"):
        layer.loss()(torch.randn(4, 3).log_softmax(1), torch.tensor([0, 1, 2, 0]))


# ----------------------------------------------------------------------------- MID
def test_mid_gradient_equals_loss_plus_lambda_kl_written_plainly():
    torch.manual_seed(0)
    a = torch.randn(6, 10, requires_grad=True)
    head = nn.Linear(10, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    mid = MIDLayer(10, 0.3, bottleneck=4, hidden=8, seed=2)
    F.cross_entropy(head(mid(a)), y).backward()
    got = a.grad.clone()
    # plain: same weights, same noise draw, KL added to the loss by hand
    a2 = a.detach().clone().requires_grad_(True)
    h = mid.encoder(a2)
    mu, std = h[:, :4], F.softplus(h[:, 4:])
    eps = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    z = mu + std * eps
    # KL(N(mu, std^2) || N(0, 1)) per unit, averaged over the batch and the 4 units
    kl = (
        sum(
            kl_divergence(torch.distributions.Normal(mu[i, j], std[i, j]), torch.distributions.Normal(0.0, 1.0))
            for i in range(6)
            for j in range(4)
        )
        / 24
    )
    (F.cross_entropy(head(mid.decoder(z)), y) + 0.3 * kl).backward()
    torch.testing.assert_close(got, a2.grad)
    mid.eval()
    torch.testing.assert_close(mid(a.detach()), mid.decoder(mid.encoder(a.detach())[:, :4]))


# ----------------------------------------------------------------------------- against the norm attack
@pytest.fixture(scope="module")
def binary_runs(fmnist_dir):
    """T-shirt (class 0, 10%) against the rest, 1200 Fashion-MNIST rows, one epoch: the norm attack's AUC."""
    from splitnn.data import load_dataset

    d = load_dataset("fashion-mnist", "train", data_dir=fmnist_dir, download=False, progress=False, limit=1200)
    b = Dataset(d.features, (d.labels == 0).long(), "t-shirt-vs-rest", 2)
    cfg = PrivacyConfig(train_size=1200, victims=2, epochs=1, batch_size=64, download=False)
    out = {}
    for name, s in [("none", 0.0), ("label-dp", 1.0), ("marvell", 4.0)]:
        m = build_defended_model(cfg, DefenseSetting(name, s), 2, 784, train_size=len(b))
        attack = LabelLeakageAttack()
        train_defended(m, b, cfg, lambda e, idx, a, g, attack=attack: attack.observe(g, b.labels[idx]))
        out[name] = attack.result()
    return out


def test_norm_attack_reads_labels_without_defense(binary_runs):
    assert binary_runs["none"].norm_auc >= 0.9  # measured 0.957 (the paper reports >= 0.9 on imbalanced tasks)


@pytest.mark.parametrize("name, bound", [("label-dp", 0.8), ("marvell", 0.7)])
def test_each_label_defense_lowers_the_norm_attack(binary_runs, name, bound):
    # measured: label-dp eps=1 0.70, marvell s=4 0.56
    assert binary_runs[name].norm_auc < bound


@pytest.fixture(scope="module")
def mid_runs(fmnist_dir):
    """No defense and MID at lambda 0.1 and 3: 3,000 Fashion-MNIST rows, 2 epochs, on 10 classes and T-shirt vs rest.

    Per setting: 10-class and binary test accuracy (first 1,000 test images) and the label attacks' AUCs.
    """
    from splitnn.data import load_dataset

    train = load_dataset("fashion-mnist", "train", data_dir=fmnist_dir, download=False, progress=False, limit=3000)
    test = load_dataset("fashion-mnist", "test", data_dir=fmnist_dir, download=False, progress=False, limit=1000)
    b = Dataset(train.features, (train.labels == 0).long(), "t-shirt-vs-rest", 2)
    b_test = Dataset(test.features, (test.labels == 0).long(), "t-shirt-vs-rest-test", 2)
    cfg = PrivacyConfig(train_size=3000, victims=2, epochs=2, batch_size=64, download=False)
    out = {}
    for name, s in [("none", 0.0), ("mid", 0.1), ("mid", 3.0)]:
        m = build_defended_model(cfg, DefenseSetting(name, s), 10, 784, train_size=len(train))
        train_defended(m, train, cfg)
        acc = m.model.evaluate(test).accuracy
        m = build_defended_model(cfg, DefenseSetting(name, s), 2, 784, train_size=len(b))
        attack = LabelLeakageAttack()
        train_defended(m, b, cfg, lambda e, idx, a, g, attack=attack: attack.observe(g, b.labels[idx]))
        out[s] = (acc, m.model.evaluate(b_test).accuracy, attack.result())
    out["majority"] = float((b_test.labels == 0).double().mean())
    return out


def test_mid_at_a_small_strength_keeps_the_undefended_accuracy(mid_runs):
    # measured (seed 0): none 0.695 / 0.950, lambda 0.1 0.666 / 0.955 (10 classes / binary); chance 0.1, majority 0.893
    (acc, bin_acc, _), (acc_mid, bin_acc_mid, _) = mid_runs[0.0], mid_runs[0.1]
    assert acc_mid > acc - 0.05 and acc_mid > 0.5
    assert bin_acc_mid > bin_acc - 0.02 and bin_acc_mid > mid_runs["majority"] + 0.03


def test_mid_at_a_large_strength_lowers_the_direction_attack_and_still_trains(mid_runs):
    # measured (seed 0): cos AUC 1.000 -> 0.842 at lambda 3, binary accuracy 0.943; the norm attack is not lowered
    (_, _, plain), (_, bin_acc, defended) = mid_runs[0.0], mid_runs[3.0]
    assert plain.cosine_auc > 0.99
    assert defended.cosine_auc < plain.cosine_auc - 0.1
    assert bin_acc > mid_runs["majority"] + 0.03
