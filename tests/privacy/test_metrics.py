"""Metrics against independent oracles: brute-force pair counting, naive loops, known invariances."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from splitnn.errors import ConfigurationError
from splitnn.privacy.metrics import AUCAccumulator, distance_correlation, roc_auc, ssim


def _brute_auc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_equals_pair_counting_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (40,), generator=g).float()  # many ties
    labels = torch.randint(0, 2, (40,), generator=g)
    labels[0], labels[1] = 0, 1
    assert roc_auc(scores, labels) == pytest.approx(_brute_auc(scores.tolist(), labels.tolist()), abs=1e-12)


def test_roc_auc_extremes_and_scipy():
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    assert roc_auc(labels.float(), labels) == 1.0
    assert roc_auc(-labels.float(), labels) == 0.0
    assert roc_auc(torch.zeros(6), labels) == 0.5
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(9)
    scores, labels = torch.randn(200, generator=g), torch.randint(0, 2, (200,), generator=g)
    u = stats.mannwhitneyu(scores[labels == 1].numpy(), scores[labels == 0].numpy()).statistic
    assert roc_auc(scores, labels) == pytest.approx(u / (int(labels.sum()) * int((1 - labels).sum())))


def test_roc_auc_needs_both_classes():
    with pytest.raises(ConfigurationError, match="positive and one negative"):
        roc_auc(torch.rand(5), torch.ones(5))


def test_grouped_auc_counts_only_pairs_within_a_group():
    acc = AUCAccumulator()
    # Within each group the positive scores highest, but group 2 lives on a smaller scale,
    # so pooling would rank group-1 negatives above the group-2 positive.
    acc.add(torch.tensor([10.0, 20.0, 30.0]), torch.tensor([0, 0, 1]))
    acc.add(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
    acc.add(torch.tensor([5.0, 6.0]), torch.tensor([0, 0]))  # one class: adds no pairs
    assert acc.pairs == 3 and acc.value == 1.0
    pooled = roc_auc(torch.tensor([10.0, 20.0, 30.0, 1.0, 2.0]), torch.tensor([0, 0, 1, 0, 1]))
    assert pooled < 1.0
    assert math.isnan(AUCAccumulator().value)


def _naive_dcor(x: np.ndarray, y: np.ndarray) -> float:
    n = len(x)

    def centred(z):
        d = np.array([[np.linalg.norm(z[i] - z[j]) for j in range(n)] for i in range(n)])
        return d - d.mean(0, keepdims=True) - d.mean(1, keepdims=True) + d.mean()

    a, b = centred(x), centred(y)
    return math.sqrt((a * b).mean() / math.sqrt((a * a).mean() * (b * b).mean()))


def test_distance_correlation_matches_naive_formula_and_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = x[:, :2] ** 2 + 0.3 * torch.randn(30, 2, generator=g, dtype=torch.float64)
    assert float(distance_correlation(x, y)) == pytest.approx(_naive_dcor(x.numpy(), y.numpy()), abs=1e-6)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    assert float(distance_correlation(x, 3 * x @ q + 7)) == pytest.approx(1.0, abs=1e-6)
    indep = distance_correlation(torch.randn(400, 3, generator=g), torch.randn(400, 3, generator=g))
    assert float(indep) < 0.2  # V-statistic bias for n=400 in 3-D is about 0.1
    assert float(distance_correlation(x, torch.ones(30, 2))) == 0.0


def test_distance_correlation_is_differentiable():
    x = torch.randn(16, 4)
    a = torch.randn(16, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(distance_correlation(x, a), a)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def _naive_ssim(a: np.ndarray, b: np.ndarray, L: float = 1.0) -> float:
    coords = np.arange(11) - 5.0
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_naive_windowed_formula():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 1, 14, 15, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(2, 1, 14, 15, generator=g, dtype=torch.float64)).clamp(0, 1)
    per_image = ssim(a, b, reduction="none")
    for k in range(2):
        assert float(per_image[k]) == pytest.approx(_naive_ssim(a[k, 0].numpy(), b[k, 0].numpy()), abs=1e-9)
    assert float(ssim(a, a)) == pytest.approx(1.0)
    noisier = (a + 0.5 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert float(ssim(a, noisier)) < float(ssim(a, b)) < 1.0


def test_ssim_rejects_bad_shapes():
    with pytest.raises(Exception, match="same shape"):
        ssim(torch.rand(1, 1, 28, 28), torch.rand(1, 1, 28, 27))
    with pytest.raises(ConfigurationError, match="smaller than"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
