"""A split model with a defense in place, trained step by step with the cut's tensors reported."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from splitnn.data import Dataset
from splitnn.data.batching import epoch_batches
from splitnn.errors import ConfigurationError
from splitnn.models import tutorial_mlp
from splitnn.privacy.config import PrivacyConfig
from splitnn.privacy.defenses import DefenseSetting, DPSegment, Marvell, apply_defense, defend_labels, defense_loss
from splitnn.privacy.tap import CutTap
from splitnn.split import SplitNN
from splitnn.training.topologies import VerticalSplitNN
from splitnn.training.topologies.presets import vertical_mlp
from splitnn.workers import BatchRef, VirtualWorker

__all__ = [
    "DefendedModel",
    "build_defended_model",
    "train_defended",
    "query_cut_activations",
    "merge_party_segments",
    "data_holder_architecture",
    "build_defended_vertical",
]


def merge_party_segments(segments: Sequence[nn.Module], workers: Sequence[str]) -> tuple[list[nn.Module], list[str]]:
    """Merge consecutive segments of the same party into one ``nn.Sequential``; return (segments, parties)."""
    merged: list[list[nn.Module]] = []
    parties: list[str] = []
    for seg, name in zip(segments, workers):
        if parties and parties[-1] == name:
            merged[-1].append(seg)
        else:
            merged.append([seg])
            parties.append(name)
    return [group[0] if len(group) == 1 else nn.Sequential(*group) for group in merged], parties


@dataclass
class DefendedModel:
    """A split model with a defense in place and a :class:`CutTap` at the cut."""

    model: SplitNN
    tap: CutTap
    setting: DefenseSetting
    dp: DPSegment | None = None

    def epsilon(self, delta: float) -> float:
        """The ``dp`` defense's privacy spent at ``delta`` so far (NaN without ``dp``)."""
        return math.nan if self.dp is None else self.dp.epsilon(delta)


def build_defended_model(
    config: PrivacyConfig,
    setting: DefenseSetting,
    num_classes: int,
    in_features: int,
    *,
    defense_seed: int | None = None,
    fuse: bool = True,
    train_size: int | None = None,
) -> DefendedModel:
    """The tutorial MLP of ``config`` on in-process workers, with ``setting`` applied and a tap at the cut.

    Initial weights come from ``torch.manual_seed(config.seed)`` (the global RNG
    is restored afterwards), so every setting starts from the same weights.
    ``train_size`` (the training set's size) sets ``dp``'s sampling rate.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        segments = tutorial_mlp(config.hidden, in_features=in_features, classes=num_classes)
    segments, parties = merge_party_segments(segments, config.workers)
    rate = None if train_size is None else min(1.0, config.batch_size / train_size)
    segments = apply_defense(segments, setting, config.defense_options(defense_seed, sample_rate=rate))
    for m in segments[-1].modules():
        if isinstance(m, Marvell):  # on the main task, Marvell hides the positive class against the rest
            m.positive = config.positive_class if num_classes > 2 else None
    tap = CutTap()
    segments[0] = nn.Sequential(segments[0], tap)
    workers = [VirtualWorker(name, fuse=fuse) for name in parties]
    dp = next((m for m in segments[0].modules() if isinstance(m, DPSegment)), None)
    model = SplitNN(segments, workers, optimizer=f"sgd:lr={config.lr}", loss=defense_loss(segments))
    return DefendedModel(model, tap, setting, dp)


BatchObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def train_defended(
    defended: DefendedModel,
    train: Dataset,
    config: PrivacyConfig,
    on_batch: BatchObserver | None = None,
    *,
    desc: str = "train",
) -> None:
    """Train as :meth:`SplitNN.fit` does (same batches, same order) and report each step's cut tensors.

    ``on_batch(epoch, indices, activation, gradient)`` receives, after each step,
    the activation the data holder sent and the gradient it got back.
    """
    model, tap = defended.model, defended.tap
    train = defend_labels(train, defended.setting, config.defense_options())
    name, n = model.prepare(train)
    tap.take()
    steps = [
        (epoch, idx)
        for epoch in range(config.epochs)
        for idx in epoch_batches(n, config.batch_size, shuffle=True, seed=config.seed, epoch=epoch)
    ]
    for epoch, idx in tqdm(steps, desc=desc, unit="batch", leave=False, disable=not config.progress, mininterval=0.5):
        model.train_batch(name, idx)
        acts, grads = tap.take()
        if on_batch is not None:
            if len(acts) != 1 or len(grads) != 1:
                raise ConfigurationError(
                    f"the cut tap saw {len(acts)} activations and {len(grads)} gradients in one "
                    f"step; is the tap the last layer of the data holder's segment?"
                )
            on_batch(epoch, idx, acts[0], grads[0])


@torch.no_grad()
def query_cut_activations(
    model: SplitNN, features: torch.Tensor, *, batch_size: int = 1000, dataset: str = "privacy-aux-query"
) -> torch.Tensor:
    """The data holder's cut activations for ``features`` (evaluation mode, defenses as at inference)."""
    stage = model.stages[0]
    worker = stage.worker
    worker.add_dataset(dataset, features=features, replace=True)  # the same name at every query
    outs = []
    for idx in torch.arange(features.shape[0]).split(batch_size):
        ref = worker.forward(stage.key, BatchRef(dataset, idx), train=False)
        outs.append(worker.fetch(ref, kind="activation"))
    return torch.cat(outs)


def data_holder_architecture(config: PrivacyConfig, in_features: int, classes: int) -> Callable[[], nn.Module]:
    """Builds the data holder's undefended segment with fresh weights (what an architecture-aware attacker knows)."""

    def build() -> nn.Module:
        segments = tutorial_mlp(config.hidden, in_features=in_features, classes=classes)
        return merge_party_segments(segments, config.workers)[0][0]

    return build


def build_defended_vertical(
    config: PrivacyConfig, setting: DefenseSetting, columns: Sequence[torch.Tensor], num_classes: int
) -> VerticalSplitNN:
    """Two holders (alice, ``bob-features``) with ``columns`` of each sample, bob's top on ``bob``;
    ``setting`` placed on alice's bottom (a data holder's defense: ``nopeek`` or ``noise``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        bottoms, top = vertical_mlp([len(c) for c in columns], config.hidden, num_classes, "concat")
    bottoms[0] = apply_defense([bottoms[0], top[-1]], setting, config.defense_options())[0]
    holders = [VirtualWorker("alice"), VirtualWorker("bob-features")]
    return VerticalSplitNN(
        bottoms, holders, top, VirtualWorker("bob"), columns=columns, optimizer=f"sgd:lr={config.lr}"
    )
