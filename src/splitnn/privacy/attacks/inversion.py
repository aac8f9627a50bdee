"""Input reconstruction (model inversion) from the activations at the cut.

The receiving party (the next worker after the data holder) trains a decoder that
maps cut activations back to inputs. It trains on an *auxiliary public sample*:
inputs from the same distribution for which it can obtain the data holder's cut
activations (query access to the data holder's segment, e.g. public records the
data holder also processes). It then applies the decoder to the activations it
received during training for the data holder's private inputs, which it never sees.

Quality of the reconstructions is measured against the true private inputs by
mean squared error, SSIM, and the accuracy of a plain classifier trained on clean
data when applied to the reconstructions (are they recognisable?).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from splitnn.checks import check_counts
from splitnn.errors import ConfigurationError, ShapeMismatchError
from splitnn.privacy.metrics import mse, ssim


@dataclass(frozen=True)
class InversionConfig:
    """How the attacker's decoder (and the evaluator's reference classifier) are trained.

    Attributes:
        hidden: width of the decoder's two hidden layers.
        epochs: passes over the auxiliary sample.
        batch_size: decoder minibatch size.
        lr: Adam learning rate.
        classifier_epochs: passes of the reference classifier over its clean training data.
        seed: seed of the weights and the data order (own generator).
    """

    hidden: int = 512
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    classifier_epochs: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        check_counts(self, ("hidden", "epochs", "batch_size", "classifier_epochs"))
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ConfigurationError(f"InversionConfig.lr must be a positive number, got {self.lr!r}")


class _Standardize(nn.Module):
    """x -> (x - mean) / std with fixed statistics (of the attacker's auxiliary activations)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _fit(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn, cfg: InversionConfig, job: tuple
) -> nn.Module:
    """Adam on ``loss_fn(model(inputs), targets)``; ``job``: (epochs, seed of the data order, desc, progress)."""
    epochs, seed, desc, progress = job
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    n = inputs.shape[0]
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", leave=False, disable=not progress):
        for idx in torch.randperm(n, generator=generator).split(cfg.batch_size):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(inputs[idx]), targets[idx]).backward()
            opt.step()
    return model.eval()


def _seeded_init(seed: int, build) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def train_decoder(
    activations: torch.Tensor, images: torch.Tensor, config: InversionConfig | None = None, *, progress: bool = False
) -> nn.Module:
    """Train a decoder from cut activations (N, ...) to images (N, C, H, W) in [-1, 1] (MSE loss).

    The decoder standardises its input with the statistics of ``activations``,
    then runs an MLP with two ReLU hidden layers and a ``tanh`` output. The
    global random state is left as it was.
    """
    cfg = config or InversionConfig()
    if activations.shape[0] != images.shape[0]:
        raise ShapeMismatchError(f"{activations.shape[0]} activations but {images.shape[0]} images")
    acts = activations.detach().reshape(activations.shape[0], -1).float()
    images = images.detach().float()
    d_in, d_out = acts.shape[1], int(math.prod(images.shape[1:]))
    std = acts.std(dim=0).clamp_min(1e-6)
    decoder = _seeded_init(
        cfg.seed,
        lambda: nn.Sequential(
            _Standardize(acts.mean(dim=0), std),
            nn.Linear(d_in, cfg.hidden),
            nn.ReLU(),
            nn.Linear(cfg.hidden, cfg.hidden),
            nn.ReLU(),
            nn.Linear(cfg.hidden, d_out),
            nn.Tanh(),
            nn.Unflatten(1, tuple(images.shape[1:])),
        ),
    )
    return _fit(decoder, acts, images, F.mse_loss, cfg, (cfg.epochs, cfg.seed, "decoder", progress))


@torch.no_grad()
def reconstruct(decoder: nn.Module, activations: torch.Tensor) -> torch.Tensor:
    """The decoder's reconstructions of the inputs behind ``activations``."""
    decoder.eval()
    return decoder(activations.detach().reshape(activations.shape[0], -1).float())


def train_reference_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: InversionConfig | None = None,
    *,
    progress: bool = False,
) -> nn.Module:
    """A plain MLP classifier (inputs -> 256 -> classes) trained on clean images, to judge reconstructions."""
    cfg = config or InversionConfig()
    d_in = int(math.prod(images.shape[1:]))
    model = _seeded_init(
        cfg.seed + 1, lambda: nn.Sequential(nn.Flatten(), nn.Linear(d_in, 256), nn.ReLU(), nn.Linear(256, num_classes))
    )
    job = (cfg.classifier_epochs, cfg.seed + 1, "reference classifier", progress)
    return _fit(model, images.detach().float(), labels.long(), F.cross_entropy, cfg, job)


@dataclass(frozen=True)
class InversionResult:
    """How well reconstructions match the true inputs.

    ``mse`` and ``ssim`` are computed after mapping pixel values to [0, 1];
    ``classifier_accuracy`` is the reference classifier's accuracy on the
    reconstructions (compare with its accuracy on the true inputs and with chance).
    """

    mse: float
    ssim: float
    classifier_accuracy: float


@torch.no_grad()
def evaluate_reconstructions(
    reconstructions: torch.Tensor,
    truth: torch.Tensor,
    labels: torch.Tensor,
    classifier: nn.Module,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> InversionResult:
    """MSE, SSIM (both on a [0, 1] pixel scale) and reference-classifier accuracy of ``reconstructions``."""
    if reconstructions.shape != truth.shape:
        raise ShapeMismatchError(f"reconstructions {tuple(reconstructions.shape)} vs inputs {tuple(truth.shape)}")
    lo, hi = value_range
    rec01, true01 = (reconstructions - lo) / (hi - lo), (truth - lo) / (hi - lo)
    classifier.eval()
    acc = float((classifier(reconstructions.float()).argmax(dim=1) == labels).double().mean())
    return InversionResult(mse(rec01, true01), float(ssim(rec01, true01, data_range=1.0)), acc)
