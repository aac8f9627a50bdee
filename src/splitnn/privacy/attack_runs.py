"""The experiment's attacks that need more than the cut tensors of one training run.

FSHA drives a fresh copy of the data holder's segment; model completion queries
her trained segment; UnSplit inverts the victims' activations knowing only her
segment's architecture; feature inference trains a vertical twin of the network.
"""

from __future__ import annotations

import math

import torch

from splitnn.data import column_partition
from splitnn.data.batching import epoch_batches
from splitnn.privacy.config import PrivacyConfig, PrivacyData
from splitnn.privacy.defended import (
    build_defended_model,
    build_defended_vertical,
    data_holder_architecture,
    query_cut_activations,
)
from splitnn.privacy.defenses import DefenseSetting
from splitnn.privacy.metrics import mse, ssim
from splitnn.split import SplitNN

__all__ = ["UNSPLIT_VICTIMS", "run_fsha", "run_completion", "run_unsplit", "run_feature_inference"]

#: Victims the UnSplit attacker inverts (one batch, the first victims).
UNSPLIT_VICTIMS = 64

#: Defenses the feature-inference run applies to the data holder's bottom (the others protect labels).
FEATURE_DEFENSES = ("none", "nopeek", "noise")


def _pixels01(rec: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """MSE and SSIM of images in [-1, 1], on a [0, 1] scale."""
    rec01, true01 = (rec + 1) / 2, (truth + 1) / 2
    return mse(rec01, true01), float(ssim(rec01, true01, data_range=1.0))


def run_fsha(config: PrivacyConfig, setting: DefenseSetting, data: PrivacyData, in_features: int) -> float:
    """FSHA against the data holder's (defended) segment, fresh from the initial weights; final MSE."""
    from splitnn.privacy.attacks.fsha import FSHA, FSHAConfig

    victim = build_defended_model(config, setting, data.private.num_classes, in_features, train_size=len(data.private))
    stage = victim.model.stages[0]
    stage.worker.add_dataset("fsha-private", features=data.private.features, replace=True)
    n = len(data.private)
    batches: list[torch.Tensor] = []
    epoch = 0
    while len(batches) < config.fsha_steps:
        batches += epoch_batches(n, config.batch_size, shuffle=True, seed=config.seed, epoch=epoch)
        epoch += 1
    probe = query_cut_activations(victim.model, data.aux.features[:2])
    attacker = FSHA(
        data.aux.features, int(probe[0].numel()), FSHAConfig(seed=config.seed, batch_size=config.batch_size)
    )
    return attacker.attack(
        stage.worker, stage.key, "fsha-private", batches[: config.fsha_steps], data.private.features
    ).final_mse()


def run_completion(model: SplitNN, data: PrivacyData) -> float:
    """Model completion by the data holder: her trained segment's outputs, 4 known labels per class."""
    from splitnn.privacy.attacks.completion import ModelCompletion, few_labels

    known = few_labels(data.aux.labels, 4, data.aux.num_classes)
    head = ModelCompletion(data.aux.num_classes).fit(
        query_cut_activations(model, data.aux.features[known]), data.aux.labels[known]
    )
    return head.accuracy(query_cut_activations(model, data.test.features), data.test.labels)


def run_unsplit(config: PrivacyConfig, activations: torch.Tensor, truth: torch.Tensor, classes: int) -> tuple:
    """UnSplit on the first :data:`UNSPLIT_VICTIMS` victims' activations; (MSE, SSIM) on a [0, 1] pixel scale."""
    from splitnn.privacy.attacks.unsplit import UnSplit, UnSplitConfig

    n = min(UNSPLIT_VICTIMS, len(activations))
    in_features = math.prod(truth.shape[1:])
    attack = UnSplit(
        data_holder_architecture(config, in_features, classes),
        UnSplitConfig(rounds=config.unsplit_rounds, seed=config.seed),
    )
    return _pixels01(attack.attack(activations[:n], tuple(truth.shape[1:])).reconstructions, truth[:n])


def run_feature_inference(config: PrivacyConfig, setting: DefenseSetting, data: PrivacyData) -> float:
    """GRN against a vertical twin of the network; MSE (pixels on [0, 1]) of the victims' guessed half.

    The data holder (alice) holds the left half of every image, the label party (bob) the
    right half and the labels (its own bottom on a worker of its own, ``bob-features``).
    The defense, if it is one of :data:`FEATURE_DEFENSES`, is on alice's bottom; NaN otherwise.
    """
    from splitnn.privacy.attacks.feature_inference import FeatureInference, FeatureInferenceConfig

    if setting.name not in FEATURE_DEFENSES:
        return math.nan
    shape = tuple(data.private.features.shape[1:])
    columns = column_partition(shape, 2)
    model = build_defended_vertical(config, setting, columns, data.private.num_classes)
    model.fit(data.private, epochs=config.epochs, batch_size=config.batch_size, seed=config.seed, progress=False)
    net = model.collect().eval()
    victims = data.private.features[: config.victims].flatten(1)
    alice, bob = victims[:, columns[0]], victims[:, columns[1]]
    with torch.no_grad():
        predictions = net([alice, bob])
    cfg = FeatureInferenceConfig(epochs=config.feature_epochs, value_range=(-1.0, 1.0), seed=config.seed)
    centre = data.aux.features.flatten(1)[:, columns[0]].mean(dim=0)  # the attacker's public-data prior
    attack = FeatureInference(net, 0, (len(columns[0]),), cfg).fit([bob], predictions, center=centre)
    guess = attack.reconstruct([bob])
    return mse((guess + 1) / 2, (alice + 1) / 2)
