"""DP-SGD at the data holder: per-example clipping and Gaussian noise on its segment's gradients.

:class:`DPSegment` wraps the data holder's segment; its docstring says how the gradient is computed
(as opacus's ``DPOptimizer``), how the privacy spent is accounted and what the guarantee covers.
:func:`rdp_epsilon` and :func:`dp_noise_multiplier` are the accountant's two directions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from splitnn.errors import ConfigurationError
from splitnn.privacy.defenses._rng import SeededStream, check_seed

__all__ = ["DPSegment", "dp_noise_multiplier", "rdp_epsilon"]


def _positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"DPSegment: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_rate(sample_rate: object) -> float:
    if (
        isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not (0 < sample_rate <= 1)  # type: ignore[operator]
    ):
        raise ConfigurationError(f"sample_rate must be in (0, 1] (batch_size / dataset size), got {sample_rate!r}")
    return float(sample_rate)


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``steps`` DP-SGD steps, by opacus's RDP accountant."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    if steps > 0:
        acc.history = [(float(noise_multiplier), _check_rate(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta)) if steps > 0 else 0.0


def dp_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, *, epochs: int) -> float:
    """The noise multiplier that spends at most ``target_epsilon`` at ``delta`` in ``epochs`` epochs (opacus, RDP).

    An epoch is ``ceil(1 / sample_rate)`` steps, as ``fit`` draws them (the last batch may be short).
    """
    from opacus.accountants.utils import get_noise_multiplier

    _positive("target_epsilon", target_epsilon)
    if not (isinstance(delta, float) and 0 < delta < 1):
        raise ConfigurationError(f"delta must be a float in (0, 1), got {delta!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigurationError(f"epochs must be a positive integer, got {epochs!r}")
    rate = _check_rate(sample_rate)
    steps = epochs * math.ceil(1 / rate - 1e-9)
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=rate, steps=steps))


def _refuse_batch_dependent(module: nn.Module) -> None:
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ConfigurationError(
                f"DPSegment: layer {name or type(m).__name__} ({type(m).__name__}) mixes the examples of a "
                f"batch, so per-example clipping bounds nothing; use GroupNorm or LayerNorm instead"
            )


class _DPBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: DPSegment, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        ctx.save_for_backward(x, *params)
        return functional_call(layer.inner, dict(zip(layer._names, params)), (x,))

    @staticmethod
    def backward(ctx, cut_grad: torch.Tensor):  # type: ignore[override]
        x, *params = ctx.saved_tensors
        grads = ctx.layer._private_grads(x, params, cut_grad)
        return (None, None, *grads)


class DPSegment(nn.Module):
    """The data holder's segment, trained with DP-SGD.

    :class:`DPSegment` wraps the data holder's segment (the first of the chain, whose
    input is the private data). Forward is the wrapped segment, unchanged. Backward
    starts from the gradient at the cut that the next party sent: for every example
    ``i`` of the batch it computes the gradient of that example's loss with respect
    to the segment's weights (``torch.func.vmap`` over ``torch.func.grad`` of
    ``<segment(x_i), cut_grad_i>``), clips it to L2 norm ``max_grad_norm`` (the
    norm over all the segment's parameters together), sums, adds Gaussian noise of
    standard deviation ``noise_multiplier * max_grad_norm`` and, for a mean loss,
    divides by the batch size: exactly opacus's ``DPOptimizer`` (same clip factor,
    same noise draws in parameter order from the layer's own generator), so the
    party's ordinary optimizer then steps on a DP-SGD gradient.

    Every training backward is one step of opacus's RDP accountant (noise multiplier,
    sampling rate ``batch_size / n``); :meth:`DPSegment.epsilon` gives the privacy
    spent at ``delta`` so far, and :meth:`DPSegment.epoch_reporter` gives an
    ``on_epoch`` callback for :meth:`SplitNN.fit` that writes it into each epoch's
    ``test_metrics["epsilon"]`` (so ``history.metric("epsilon")`` lists it per epoch).
    :meth:`DPSegment.for_target_epsilon` picks the noise multiplier for a target
    epsilon with opacus's ``get_noise_multiplier``.

    What the guarantee covers: the data holder's weights (and so everything computed
    from them later) are (epsilon, delta)-DP with respect to one training example.
    The activations it sends at the cut during training are *not* covered (they are
    computed from the raw example before any noise); pair DP-SGD with ``noise`` at
    the cut to protect them. The RDP analysis assumes Poisson sampling; ``fit`` draws
    fixed-size shuffled batches, the usual approximation (opacus makes the same
    choice when ``poisson_sampling=False``).

    Layers whose output for one example depends on the others (batch norm) break
    per-example privacy and are refused.

    Args:
        inner: the segment (first of the chain; its input needs no gradient).
        noise_multiplier: noise std in units of ``max_grad_norm`` (0: clipping only, no privacy).
        max_grad_norm: per-example gradient norm bound C.
        sample_rate: batch size / training set size (for the accountant); may be set later by :meth:`bind`.
        loss_reduction: ``"mean"`` (the label holder's loss averages over the batch, the default) or ``"sum"``.
        seed: seed of the layer's own noise generator (the global RNG is never used).
    """

    def __init__(
        self,
        inner: nn.Module,
        noise_multiplier: float,
        max_grad_norm: float = 1.0,
        *,
        sample_rate: float | None = None,
        loss_reduction: str = "mean",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(inner, nn.Module):
            raise ConfigurationError(f"DPSegment wraps an nn.Module, got {type(inner).__name__}")
        _refuse_batch_dependent(inner)
        if loss_reduction not in ("mean", "sum"):
            raise ConfigurationError(f"DPSegment: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.inner = inner
        self.noise_multiplier = _positive("noise_multiplier", noise_multiplier, allow_zero=True)
        self.max_grad_norm = _positive("max_grad_norm", max_grad_norm)
        self.sample_rate = None if sample_rate is None else _check_rate(sample_rate)
        self.loss_reduction = loss_reduction
        self.seed = check_seed(seed, "DPSegment")
        self._stream = SeededStream(self.seed)
        self.steps = 0
        self._history: list[tuple[float, float, int]] = []

    @classmethod
    def for_target_epsilon(
        cls,
        inner: nn.Module,
        target_epsilon: float,
        delta: float,
        *,
        sample_rate: float,
        epochs: int,
        max_grad_norm: float = 1.0,
        **kwargs,
    ) -> DPSegment:
        """A layer whose noise spends ``target_epsilon`` at ``delta`` over ``epochs`` epochs of ``sample_rate``."""
        sigma = dp_noise_multiplier(target_epsilon, delta, sample_rate, epochs=epochs)
        return cls(inner, sigma, max_grad_norm, sample_rate=sample_rate, **kwargs)

    def bind(self, dataset_size: int, batch_size: int) -> DPSegment:
        """Set the sampling rate from the training set size and batch size; returns ``self``."""
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
            raise ConfigurationError(f"dataset_size must be a positive integer, got {dataset_size!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.sample_rate = min(1.0, batch_size / dataset_size)
        return self

    @property
    def _names(self) -> list[str]:
        return [n for n, p in self.inner.named_parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = [p for p in self.inner.parameters() if p.requires_grad]
        if not self.training or not torch.is_grad_enabled() or not params:
            return self.inner(x)
        if x.requires_grad:
            raise ConfigurationError(
                "DPSegment must be the first segment (its input is the private data, which needs no gradient)"
            )
        return _DPBackward.apply(x, self, *params)

    def _private_grads(self, x: torch.Tensor, params: list[torch.Tensor], cut_grad: torch.Tensor) -> list[torch.Tensor]:
        if self.sample_rate is None:
            raise ConfigurationError(
                "DPSegment: the sampling rate is unknown; pass sample_rate=batch_size/n or call bind(n, batch_size)"
            )
        names = self._names
        buffers = dict(self.inner.named_buffers())
        n = x.shape[0]

        def example_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
            out = functional_call(self.inner, (p, buffers), (xi.unsqueeze(0),))
            return (out * gi.unsqueeze(0)).sum()

        detached = {k: p.detach() for k, p in zip(names, params)}
        per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(detached, x.detach(), cut_grad)
        samples = [per_example[k] * (n if self.loss_reduction == "mean" else 1) for k in names]
        norms = torch.stack([g.reshape(n, -1).norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        std = self.noise_multiplier * self.max_grad_norm
        out = []
        for g, p in zip(samples, params):
            summed = torch.einsum("i,i...", factor.to(g.dtype), g)
            if std > 0:
                gen = self._stream.generator(p.device)
                summed = summed + torch.normal(0, std, size=summed.shape, generator=gen, device=p.device, dtype=p.dtype)
            out.append(summed / n if self.loss_reduction == "mean" else summed)
        self._record_step()
        return out

    def _record_step(self) -> None:
        self.steps += 1
        key = (self.noise_multiplier, float(self.sample_rate))  # type: ignore[arg-type]
        if self._history and self._history[-1][:2] == key:
            self._history[-1] = (*key, self._history[-1][2] + 1)
        else:
            self._history.append((*key, 1))

    def epsilon(self, delta: float) -> float:
        """Privacy spent so far: epsilon at ``delta`` (opacus's RDP accountant); ``inf`` without noise."""
        from opacus.accountants import RDPAccountant

        if not (isinstance(delta, float) and 0 < delta < 1):
            raise ConfigurationError(f"delta must be a float in (0, 1), got {delta!r}")
        if not self._history:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        acc = RDPAccountant()
        acc.history = list(self._history)
        return float(acc.get_epsilon(delta))

    def epoch_reporter(self, delta: float, then: Callable | None = None) -> Callable:
        """An ``on_epoch`` callback for ``fit``: puts ``epsilon`` at ``delta`` into each epoch's ``test_metrics``."""
        self.epsilon(delta)  # validates delta now, before training

        def report(stats) -> None:
            stats.test_metrics["epsilon"] = self.epsilon(delta)
            if then is not None:
                then(stats)

        return report

    def reset_rng(self) -> None:
        """Restart the noise stream from ``seed``."""
        self._stream.reset()

    def extra_repr(self) -> str:
        return (
            f"noise_multiplier={self.noise_multiplier:g}, max_grad_norm={self.max_grad_norm:g}, "
            f"sample_rate={self.sample_rate}, seed={self.seed}"
        )
