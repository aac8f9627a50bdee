"""Leakage and quality metrics: distance correlation, ROC AUC, SSIM, MSE.

Everything here is plain torch (no scikit-learn or scikit-image), deterministic
and free of random numbers.

- :func:`distance_correlation`: Székely's sample distance correlation between two
  sets of paired samples (0: independent, 1: one is a similarity transform of the
  other). Differentiable, so NoPeek can use it as a penalty.
- :func:`roc_auc` / :class:`AUCAccumulator`: the area under the ROC curve of a score
  that should rank positives above negatives, computed exactly from ranks (the
  Mann-Whitney statistic; ties count one half), optionally only over pairs that
  come from the same group (the same training batch).
- :func:`ssim`: the structural similarity index of Wang et al. (2004), Gaussian
  window 11 x 11 with sigma 1.5, K1 = 0.01, K2 = 0.03, "valid" windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from splitnn.errors import ConfigurationError, ShapeMismatchError

__all__ = ["distance_correlation", "roc_auc", "AUCAccumulator", "ssim", "mse"]


def _double_centred_distances(x: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, y: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """Sample distance correlation between rows of ``x`` and rows of ``y`` (a 0-d tensor in [0, 1]).

    Both are flattened to ``(N, -1)``; row ``i`` of ``x`` is paired with row ``i``
    of ``y``. Uses the (biased) V-statistic of Székely, Rizzo and Bakirov (2007):
    ``dCor^2 = dCov^2(x, y) / sqrt(dVar^2(x) dVar^2(y))``, returning ``dCor``.
    Differentiable in both arguments. A constant ``x`` or ``y`` gives 0.
    """
    if x.shape[0] != y.shape[0]:
        raise ShapeMismatchError(f"distance_correlation pairs rows: got {x.shape[0]} and {y.shape[0]} rows")
    if x.shape[0] < 2:
        raise ConfigurationError("distance_correlation needs at least 2 samples")
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if x.dtype != y.dtype:
        dtype = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(dtype), y.to(dtype)
    a, b = _double_centred_distances(x), _double_centred_distances(y)
    dcov2 = (a * b).mean()
    denom = ((a * a).mean() * (b * b).mean()).sqrt()
    if float(denom.detach()) <= eps:
        return (dcov2 * 0).clamp_min(0)
    return (dcov2 / denom).clamp_min(0).add(eps).sqrt()


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values`` with ties given their average rank."""
    order = torch.argsort(values, stable=True)
    sorted_vals = values[order]
    _, counts = torch.unique_consecutive(sorted_vals, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    avg = ends - (counts.to(torch.float64) - 1) / 2  # average of positions start+1..end
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(avg, counts)
    return ranks


def _u_statistic(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(number of positive-over-negative pairs, ties counting 1/2; number of pairs)."""
    scores = scores.detach().reshape(-1).to(torch.float64).cpu()
    pos = labels.detach().reshape(-1).cpu().bool()
    if scores.numel() != pos.numel():
        raise ShapeMismatchError(f"roc_auc: {scores.numel()} scores but {pos.numel()} labels")
    if torch.isnan(scores).any():
        raise ConfigurationError("roc_auc: scores contain NaN")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.0, 0
    ranks = _average_ranks(scores)
    u = float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2
    return u, n_pos * n_neg


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive).

    Equals the probability that a random positive scores above a random negative
    (ties count one half). Raises :class:`ConfigurationError` when only one class is present.
    """
    u, pairs = _u_statistic(scores, labels)
    if pairs == 0:
        raise ConfigurationError("roc_auc needs at least one positive and one negative sample")
    return u / pairs


@dataclass
class AUCAccumulator:
    """ROC AUC over pairs drawn from the same group (e.g. the same training batch).

    Scores computed at different training steps live on different scales (the
    gradients shrink as training goes on), so an attacker compares samples within
    a step. :meth:`add` one group at a time; :attr:`value` is the fraction of
    (positive, negative) pairs of the same group that the score orders correctly.
    """

    u: float = 0.0
    pairs: int = 0

    def add(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one group's scores and binary labels (groups with one class add nothing)."""
        u, pairs = _u_statistic(scores, labels)
        self.u += u
        self.pairs += pairs

    @property
    def value(self) -> float:
        """The AUC over all pairs added so far (NaN when there were none)."""
        return self.u / self.pairs if self.pairs else float("nan")


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error between two tensors of the same shape."""
    if a.shape != b.shape:
        raise ShapeMismatchError(f"mse: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    return float(F.mse_loss(a.detach().to(torch.float64), b.detach().to(torch.float64)))


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    data_range: float = 1.0,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: str = "mean",
) -> torch.Tensor:
    """Structural similarity of image batches ``a`` and ``b`` of shape (N, C, H, W).

    Local means, variances and covariance are Gaussian-weighted over every full
    ``window`` x ``window`` patch (no padding), per channel;
    ``SSIM = (2 mu_a mu_b + C1)(2 cov + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))``
    with ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2`` and ``L = data_range``; the map is
    averaged per image. ``reduction``: ``"mean"`` (a 0-d tensor) or ``"none"`` (one per image).
    Identical images score 1.
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ShapeMismatchError(
            f"ssim needs two (N, C, H, W) batches of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if min(a.shape[-2:]) < window:
        raise ConfigurationError(
            f"ssim: images of size {tuple(a.shape[-2:])} are smaller than the {window}-pixel window"
        )
    if reduction not in ("mean", "none"):
        raise ConfigurationError(f"ssim: reduction must be 'mean' or 'none', got {reduction!r}")
    dtype = torch.float64
    a, b = a.detach().to(dtype), b.detach().to(dtype)
    n, c = a.shape[:2]
    w = _gaussian_window(window, sigma, dtype).expand(c, 1, window, window)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    per_image = smap.reshape(n, -1).mean(dim=1)
    return per_image.mean() if reduction == "mean" else per_image
