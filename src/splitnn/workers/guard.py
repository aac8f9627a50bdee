"""A data holder's hijack detector: SplitGuard-style fake batches, checked on the gradients that come back.

:class:`HijackGuard` is the detector; its docstring says how fake batches are made and scored, when
it trips and where it does not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from splitnn.checks import check_counts

__all__ = ["HijackGuard"]


def _rotate_half(t: torch.Tensor, shift: int) -> torch.Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[:half].roll(shift, dims=0), t[half:]])


class _Probe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: torch.Tensor, guard: HijackGuard, fake: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.guard, ctx.fake = guard, fake
        return _rotate_half(out, 1) if fake else out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        guard: HijackGuard = ctx.guard
        norms = grad.reshape(grad.shape[0], -1).norm(dim=1)
        half = grad.shape[0] // 2
        score = float(norms[:half].mean() / norms[half:].mean().clamp_min(1e-30)) if ctx.fake else None
        keep = guard._observe(score)
        return (grad if keep else torch.zeros_like(grad)), None, None


@dataclass
class HijackGuard:
    """The detector a data holder's party runs on its data-reading segments.

    SplitGuard (Erdogan et al., arXiv 2108.09052) notices a server that trains the
    data holder's segment for something other than the task (FSHA, arXiv 2012.02670):
    the data holder now and then sends a *fake* batch, whose labels are wrong, and
    compares the gradients it gets back for it with those of ordinary batches. An
    honest server's gradients come from the task's loss: once the model has learnt
    anything, wrong labels give much larger gradients. A hijacker's gradients do not
    depend on the labels at all, so fake and real batches look alike.

    Here the labels are the label holder's, so the data holder fakes them the only
    way it can: in a probe batch it sends the activations of the first half of the
    rows *rotated by one* (row ``i``'s position carries row ``i - 1``'s activation), so
    the label holder pairs each of them with another sample's label; the second half
    is sent as it is. On the way back it measures the per-sample gradient norms and
    drops the batch's gradient (it does not learn from a fake batch). The score of a
    probe is the mean gradient norm of its fake half over that of its real half (the
    same step, the same model: no drift between them); honest training drives it
    well above 1, a hijacker keeps it near 1. After
    ``warmup`` training batches, when the mean score of the last ``window`` probes is
    below ``threshold`` the guard trips: it drops that gradient and the party (its
    policy rule ``detect_hijack``) refuses every gradient after it, with the reason
    in its audit log.

    Limits: a fake batch is one of wrong labels for classification tasks with
    several balanced classes; on a binary task where one class dominates, rotation
    mostly keeps the label and the score stays low (set no guard there). Probes cost
    the label holder one batch of wrong labels every ``every`` batches.

    Args:
        threshold: alarm when the mean probe score of the last ``window`` probes is below this.
        every: one probe batch every ``every`` training batches.
        warmup: training batches before the first verdict (an untrained model's gradients
            barely depend on labels either).
        window: probes averaged for a verdict.
    """

    threshold: float = 1.1
    every: int = 5
    warmup: int = 50
    window: int = 3
    batches: int = 0
    scores: list[float] = field(default_factory=list)
    tripped_at: int | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        from splitnn.errors import ConfigurationError

        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ConfigurationError(f"detect_hijack threshold must be a number, got {self.threshold!r}")
        if not 0 < self.threshold < math.inf:
            raise ConfigurationError(f"detect_hijack threshold must be a finite number > 0, got {self.threshold!r}")
        check_counts(self, ("every", "window"))
        check_counts(self, ("warmup",), minimum=0)
        if self.every < 2:
            raise ConfigurationError("HijackGuard.every must be at least 2 (real batches between probes)")

    @property
    def tripped(self) -> bool:
        """True once the guard has raised its alarm."""
        return self.tripped_at is not None

    def wrap(self, out: torch.Tensor) -> torch.Tensor:
        """The tensor to send for this training batch's activation ``out`` (a probe every ``every`` batches)."""
        self.batches += 1
        if not out.requires_grad or out.shape[0] < 2:
            return out
        fake = self.batches % self.every == 0 and out.shape[0] >= 4
        return _Probe.apply(out, self, fake)

    def _observe(self, score: float | None) -> bool:
        """Record one batch's gradient (``score``: a probe's); False: drop it (a probe, or the alarm)."""
        if self.tripped:
            return False
        if score is None:
            return True
        self.scores.append(score)
        recent = self.scores[-self.window :]
        if self.batches >= self.warmup and len(recent) == self.window:
            mean = sum(recent) / len(recent)
            if mean < self.threshold:
                self.tripped_at = self.batches
                self.reason = (
                    f"gradients do not depend on the labels: a fake-label batch got {mean:.2f}x the gradient of "
                    f"real ones over the last {self.window} probes (honest training: >= {self.threshold:g}x); "
                    f"the server may be hijacking this segment (FSHA)"
                )
        return False
