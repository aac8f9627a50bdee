"""Label protection: perturb the gradients the label holder sends back, so they stop revealing labels.

:class:`LabelProtection` is the layer prepended to the label holder's segment (its docstring says what
the noise is and what it defeats); :func:`protect_gradient` perturbs one batch of gradients.
"""

from __future__ import annotations

import torch

from splitnn.errors import ConfigurationError
from splitnn.privacy.defenses._rng import GradientNoiseLayer, PassGradient, SeededStream


def protect_gradient(grad: torch.Tensor, strength: float, stream: SeededStream, directions: int = 1) -> torch.Tensor:
    """Add principal-direction noise to a batch of per-sample gradients (see :class:`LabelProtection`)."""
    n = grad.shape[0]
    g = grad.reshape(n, -1)
    rms = g.pow(2).sum(dim=1).mean().sqrt()
    if n >= 2:
        centred = g - g.mean(dim=0, keepdim=True)
        basis = torch.linalg.svd(centred, full_matrices=False).Vh[: min(directions, n, g.shape[1])]
    else:  # one sample: its own direction is where its label shows
        basis = (g / g.norm().clamp_min(1e-30)).reshape(1, -1)
    noise = stream.randn((n, basis.shape[0]), g) @ basis
    return (g + (strength * rms) * noise).reshape(grad.shape)


class _ProtectGradient(PassGradient):
    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        m = ctx.module
        return protect_gradient(grad, m.strength, m._stream, m.directions), None


class LabelProtection(GradientNoiseLayer):
    """Identity forward; adds label-hiding noise to the gradient flowing back to the cut.

    Prepend it to the label holder's segment: every gradient the label holder
    sends back passes through it.

    The norm and direction attacks of Li et al. (arXiv 2102.08504) read labels from
    the per-sample gradient at the cut. On a binary task the gradient of sample ``i``
    is about ``c_i * w``: a direction ``w`` shared by the batch times a scalar whose
    *sign* is the label (gradients of the two classes point in opposite directions)
    and whose *size* is larger for the rare class (the norm attack). Both live almost
    entirely along the batch's first principal direction.

    This defense is label-free and Marvell-style (Marvell optimises the noise
    covariance and concentrates it on the difference between the classes' gradients):
    it adds zero-mean Gaussian noise along the top ``directions`` principal
    directions of the batch's (centred) per-sample gradients, with standard deviation
    ``strength * r`` per direction, where ``r`` is the batch's root-mean-square
    per-sample gradient norm. Because the noise has mean zero the data holder's
    updates stay unbiased (only noisier); at ``strength`` of a few units the sign along
    the principal direction, and the norm, are dominated by noise, so both attacks
    fall towards AUC 0.5. More directions cover more classes (``classes - 1``
    directions separate ``classes`` classes) at a higher accuracy cost.

    Strength 0 leaves the gradient untouched, bit for bit, and draws nothing.

    Args:
        strength: noise standard deviation per principal direction, in units of
            the batch's RMS per-sample gradient norm. 0 disables the defense.
        directions: how many principal directions receive noise (1 suits binary tasks).
        seed: seed of the module's own random stream (the global RNG is never used).
    """

    function = _ProtectGradient

    def __init__(self, strength: float = 0.0, *, directions: int = 1, seed: int = 0) -> None:
        super().__init__(strength, seed, "LabelProtection")
        if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
            raise ConfigurationError(f"LabelProtection: directions must be a positive integer, got {directions!r}")
        self.directions = directions

    def extra_repr(self) -> str:
        return f"strength={self.strength}, directions={self.directions}, seed={self.seed}"
