"""UnSplit-style black-box model inversion (arXiv 2108.09033).

The party after the cut knows the architecture of the data holder's segment, not
its weights, and holds the activations it received for a batch. It optimises a
surrogate segment of that architecture and the batch's inputs together, in
alternation: Adam steps on the inputs (activation MSE plus a total-variation
prior, clamped to the data range), then Adam steps on the surrogate's weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from splitnn.checks import check_amounts, check_counts
from splitnn.errors import ConfigurationError, ShapeMismatchError

__all__ = ["UnSplit", "UnSplitConfig", "UnSplitResult", "total_variation"]


@dataclass(frozen=True)
class UnSplitConfig:
    """How the attacker optimises.

    Attributes:
        rounds: alternations of input steps and surrogate steps.
        input_steps: Adam steps on the inputs per round (surrogate fixed).
        model_steps: Adam steps on the surrogate's weights per round (inputs fixed).
        tv_weight: weight of the total-variation prior on the inputs.
        input_lr, model_lr: Adam learning rates of the inputs and of the surrogate.
        value_range: the data's range; the inputs are clamped to it after every step.
        init: the inputs' starting value (``None``: the low end of ``value_range``, a dark
            background; a mid-range start often converges to the negative image).
        seed: seed of the surrogate's initial weights.
    """

    rounds: int = 50
    input_steps: int = 20
    model_steps: int = 20
    tv_weight: float = 0.003
    input_lr: float = 0.01
    model_lr: float = 0.01
    value_range: tuple[float, float] = (-1.0, 1.0)
    init: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_counts(self, ("rounds", "input_steps", "model_steps"))
        check_amounts(self, ("tv_weight", "input_lr", "model_lr"))
        lo, hi = self.value_range
        if not lo < hi:
            raise ConfigurationError(f"UnSplitConfig.value_range must be (low, high) with low < high, got {lo, hi}")
        if self.init is not None and not lo <= self.init <= hi:
            raise ConfigurationError(f"UnSplitConfig.init {self.init} lies outside value_range {lo, hi}")


@dataclass(frozen=True)
class UnSplitResult:
    """The attacker's reconstructions, its activation MSE after each round, and its surrogate segment."""

    reconstructions: torch.Tensor
    activation_loss: list[float]
    surrogate: nn.Module


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbours along the last two dimensions (anisotropic TV)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


class UnSplit:
    """Black-box inversion of the data holder's segment from the activations it sent.

    Args:
        architecture: builds the segment's architecture with fresh random weights
            (what the attacker knows). Built under ``config.seed``; the global random
            state is left as it was.
        config: the optimisation (see :class:`UnSplitConfig`).
    """

    def __init__(self, architecture: Callable[[], nn.Module], config: UnSplitConfig | None = None) -> None:
        if not callable(architecture):
            raise ConfigurationError("UnSplit: architecture must be a callable returning an nn.Module")
        self.architecture = architecture
        self.config = config or UnSplitConfig()

    def attack(self, activations: torch.Tensor, input_shape: tuple[int, ...]) -> UnSplitResult:
        """Reconstruct the inputs (one per row of ``activations``), each of shape ``input_shape``."""
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            surrogate = self.architecture()
        if not isinstance(surrogate, nn.Module):
            raise ConfigurationError(f"UnSplit: architecture() returned {type(surrogate).__name__}, not an nn.Module")
        target = activations.detach().float()
        lo, hi = cfg.value_range
        start = lo if cfg.init is None else cfg.init
        x = torch.full((target.shape[0], *input_shape), float(start)).requires_grad_()
        with torch.no_grad():
            out = surrogate(x)
        if out.shape != target.shape:
            raise ShapeMismatchError(
                f"UnSplit: the architecture maps inputs {tuple(input_shape)} to {tuple(out.shape[1:])}, "
                f"but the activations have shape {tuple(target.shape[1:])}; give the data holder's architecture"
            )
        surrogate.train()
        opt_x = torch.optim.Adam([x], lr=cfg.input_lr)
        opt_m = torch.optim.Adam(surrogate.parameters(), lr=cfg.model_lr)
        history: list[float] = []
        for _ in range(cfg.rounds):
            surrogate.requires_grad_(False)
            for _ in range(cfg.input_steps):
                opt_x.zero_grad(set_to_none=True)
                loss = F.mse_loss(surrogate(x), target) + cfg.tv_weight * total_variation(x)
                loss.backward()
                opt_x.step()
                with torch.no_grad():
                    x.clamp_(lo, hi)
            fixed = x.detach()
            surrogate.requires_grad_(True)
            for _ in range(cfg.model_steps):
                opt_m.zero_grad(set_to_none=True)
                fit = F.mse_loss(surrogate(fixed), target)
                fit.backward()
                opt_m.step()
            history.append(fit.item())
        return UnSplitResult(x.detach(), history, surrogate.eval())
