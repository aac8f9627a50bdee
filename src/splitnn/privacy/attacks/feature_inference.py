"""Feature inference in vertical split learning with a generator (GRN, arXiv 2010.10152).

The label party holds the top model, its own features, and the joint model's
predictions for the samples it attacks. As in GRN it has the trained joint model
(e.g. released for prediction). It trains a generator from its own features (and
noise) to the other holder's features such that the joint model, fed its own
features and the generated ones, reproduces the predictions it saw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from splitnn.checks import check_amounts, check_counts
from splitnn.errors import ConfigurationError, ShapeMismatchError

__all__ = ["FeatureInference", "FeatureInferenceConfig"]


@dataclass(frozen=True)
class FeatureInferenceConfig:
    """How the generator is trained.

    Attributes:
        hidden: width of the generator's two hidden layers.
        noise: dimensions of the random input appended to the attacker's own features.
        epochs, batch_size, lr: Adam training of the generator over the attacked samples.
        prior_weight: weight of the mean square distance of the generated features from a
            centre (:meth:`FeatureInference.fit`'s ``center``, 0 by default: the mean of
            standardised features); GRN's regulariser against extreme values.
        value_range: the generated features are squashed into this range (``tanh``).
        seed: seed of the generator's weights, its noise and the data order (own generator).
    """

    hidden: int = 256
    noise: int = 8
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    prior_weight: float = 1.0
    value_range: tuple[float, float] = (-3.0, 3.0)
    seed: int = 0

    def __post_init__(self) -> None:
        check_counts(self, ("hidden", "epochs", "batch_size"))
        check_counts(self, ("noise",), minimum=0)
        check_amounts(self, ("lr", "prior_weight"))
        lo, hi = self.value_range
        if not lo < hi:
            raise ConfigurationError(
                f"FeatureInferenceConfig.value_range must be (low, high), low < high; got {lo, hi}"
            )


class FeatureInference:
    """GRN: reconstruct holder ``target``'s features from the joint model's predictions.

    Args:
        model: the trained joint model: ``model(parts)`` takes one tensor per holder
            (a :class:`~splitnn.training.topologies.VerticalNet`) and returns the predictions.
            Its weights are not changed.
        target: index of the attacked holder among the model's parts.
        target_shape: the shape of one sample of the attacked holder's features.
        config: the generator's training (see :class:`FeatureInferenceConfig`).
    """

    def __init__(
        self, model: nn.Module, target: int, target_shape: Sequence[int], config: FeatureInferenceConfig | None = None
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(f"FeatureInference: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise ConfigurationError(f"FeatureInference: target must be a holder index >= 0, got {target!r}")
        self.model, self.target = model, target
        self.target_shape = tuple(int(d) for d in target_shape)
        self.config = config or FeatureInferenceConfig()
        self.generator: nn.Module | None = None

    def _parts(self, known: Sequence[torch.Tensor], generated: torch.Tensor) -> list[torch.Tensor]:
        parts = list(known)
        parts.insert(self.target, generated.reshape(len(generated), *self.target_shape))
        return parts

    def _generate(self, own: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        lo, hi = self.config.value_range
        out = self.generator(torch.cat([own, noise], dim=1))  # type: ignore[misc]
        return lo + (hi - lo) * (torch.tanh(out) + 1) / 2

    def fit(
        self, known: Sequence[torch.Tensor], predictions: torch.Tensor, *, center: torch.Tensor | None = None
    ) -> FeatureInference:
        """Train the generator on the attacker's own parts ``known`` (every holder but the target, in order)
        and the joint model's ``predictions`` for the same samples. ``center``: the attacker's prior guess of
        the target's features (e.g. their mean on public data), one sample's shape; default 0."""
        cfg = self.config
        known = [k.detach().float() for k in known]
        n = len(predictions)
        if not known or any(len(k) != n for k in known):
            raise ShapeMismatchError(
                f"FeatureInference.fit: give the attacker's parts for the {n} predicted samples, "
                f"got {[len(k) for k in known]} rows"
            )
        own = torch.cat([k.flatten(1) for k in known], dim=1)
        d_out = math.prod(self.target_shape)
        centre = torch.zeros(d_out) if center is None else center.detach().float().reshape(-1)
        if centre.numel() != d_out:
            raise ShapeMismatchError(f"FeatureInference.fit: center has {centre.numel()} values, the target {d_out}")
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.generator = nn.Sequential(
                nn.Linear(own.shape[1] + cfg.noise, cfg.hidden),
                nn.ReLU(),
                nn.Linear(cfg.hidden, cfg.hidden),
                nn.ReLU(),
                nn.Linear(cfg.hidden, d_out),
            )
        self.model.eval()
        frozen = [p.requires_grad for p in self.model.parameters()]
        self.model.requires_grad_(False)
        target = predictions.detach().float()
        opt = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr)
        try:
            for _ in range(cfg.epochs):
                for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
                    noise = torch.randn(len(idx), cfg.noise, generator=gen)
                    fake = self._generate(own[idx], noise)
                    out = self.model(self._parts([k[idx] for k in known], fake))
                    loss = (out - target[idx]).pow(2).mean() + cfg.prior_weight * (fake - centre).pow(2).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        finally:
            for p, r in zip(self.model.parameters(), frozen):
                p.requires_grad_(r)
        self.generator.eval()
        return self

    @torch.no_grad()
    def reconstruct(self, known: Sequence[torch.Tensor]) -> torch.Tensor:
        """The generator's guess of the target holder's features for the samples of ``known``
        (noise: its mean, zero)."""
        if self.generator is None:
            raise ConfigurationError("FeatureInference.reconstruct: call fit first")
        own = torch.cat([k.detach().float().flatten(1) for k in known], dim=1)
        fake = self._generate(own, torch.zeros(len(own), self.config.noise))
        return fake.reshape(len(own), *self.target_shape)
