"""The privacy experiment: train with each defense setting, attack, and tabulate leakage against accuracy.

For every :class:`~splitnn.privacy.defenses.DefenseSetting` (the undefended
baseline first) :func:`run_privacy_experiment` trains the split network on the
main task with the defense in place, keeping the activations the receiving party
got for the *victims* (the first ``victims`` private samples) in the last epoch,
then runs the attacks of ``config.attacks``: decoder inversion, distance
correlation, UnSplit, the label attacks (on a binary imbalanced twin task), FSHA,
model completion and vertical feature inference. Every setting starts from the
same initial weights and data order (``seed``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from splitnn.data import Dataset
from splitnn.errors import ConfigurationError
from splitnn.privacy.attack_runs import run_completion, run_feature_inference, run_fsha, run_unsplit
from splitnn.privacy.attacks.inversion import (
    evaluate_reconstructions,
    reconstruct,
    train_decoder,
    train_reference_classifier,
)
from splitnn.privacy.attacks.label_leakage import LabelLeakageAttack
from splitnn.privacy.config import ATTACK_NAMES, PrivacyConfig, PrivacyData, load_privacy_data
from splitnn.privacy.defended import (
    DefendedModel,
    build_defended_model,
    merge_party_segments,
    query_cut_activations,
    train_defended,
)
from splitnn.privacy.defenses import DefenseSetting
from splitnn.privacy.metrics import distance_correlation

__all__ = [
    "ATTACK_NAMES",
    "PrivacyConfig",
    "PrivacyData",
    "PrivacyRow",
    "PrivacyResult",
    "DefendedModel",
    "run_privacy_experiment",
    "load_privacy_data",
    "build_defended_model",
    "train_defended",
    "query_cut_activations",
    "merge_party_segments",
]

#: Number of victims kept (per setting) for the reconstruction grid.
GRID_SAMPLES = 10


@dataclass(frozen=True)
class PrivacyRow:
    """One line of the trade-off table.

    ``accuracy``: main-task test accuracy; ``accuracy_drop``: baseline accuracy
    minus this one; ``recon_mse``/``recon_ssim``/``recon_accuracy``: inversion
    quality on the victims; ``norm_auc``/``cosine_auc``: label attacks on the
    binary task; ``dcor``: distance correlation of victims' inputs and activations;
    ``binary_accuracy``: test accuracy of the binary model; ``epsilon``: the privacy
    budget spent by ``dp`` (at the config's delta, opacus's RDP accountant) or given to
    ``label-dp``, NaN for the other defenses; ``fsha_mse``: the FSHA attacker's
    reconstruction MSE (pixels on [0, 1]) over its last 10 steps;
    ``completion_accuracy``: the data holder's model-completion accuracy on the test
    set from its trained segment and 4 known labels per class (from the auxiliary
    sample); ``unsplit_mse``/``unsplit_ssim``: the UnSplit attacker's reconstructions
    of the first 64 victims (pixels on [0, 1]); ``feature_mse``: the label party's GRN
    guess of the data holder's half of each victim, in a vertical twin (pixels on
    [0, 1]). Columns of attacks that did not run are NaN.
    """

    defense: str
    strength: float
    accuracy: float
    accuracy_drop: float
    recon_mse: float
    recon_ssim: float
    recon_accuracy: float
    norm_auc: float
    cosine_auc: float
    dcor: float
    binary_accuracy: float
    epsilon: float
    fsha_mse: float
    completion_accuracy: float
    unsplit_mse: float
    unsplit_ssim: float
    feature_mse: float
    seconds: float

    @property
    def setting(self) -> DefenseSetting:
        return DefenseSetting(self.defense, self.strength)


@dataclass
class PrivacyResult:
    """The rows of an experiment, plus what the report draws.

    ``clean_accuracy``: the reference classifier's accuracy on the victims' true
    inputs (the ceiling for ``recon_accuracy``); ``chance``: 1 / classes.
    ``grid_inputs``: the first victims' true inputs; ``grid_reconstructions``:
    their reconstructions for each setting (keyed by :attr:`DefenseSetting.label`).
    """

    config: PrivacyConfig
    rows: list[PrivacyRow]
    clean_accuracy: float
    chance: float
    grid_inputs: torch.Tensor
    grid_reconstructions: dict[str, torch.Tensor]

    def row(self, defense: str, strength: float = 0.0) -> PrivacyRow:
        """The row of one setting."""
        for r in self.rows:
            if r.defense == defense and r.strength == float(strength):
                return r
        raise KeyError(f"no row for defense {defense!r} at strength {strength}")


def _with_baseline(settings: Sequence[DefenseSetting]) -> list[DefenseSetting]:
    ordered = [DefenseSetting("none")] + list(settings)
    for s in ordered:
        if not isinstance(s, DefenseSetting):
            raise ConfigurationError(f"settings must be DefenseSetting objects, got {type(s).__name__}")
    return list(dict.fromkeys(ordered))


def _run_setting(
    config: PrivacyConfig,
    setting: DefenseSetting,
    data: PrivacyData,
    classifier: nn.Module,
    binary: tuple[Dataset, Dataset],
) -> tuple[dict, torch.Tensor]:
    start = time.perf_counter()
    in_features = int(math.prod(data.private.features.shape[1:]))
    victims, attacks, nan = config.victims, config.attacks, math.nan
    row: dict = {name: nan for name in PrivacyRow.__dataclass_fields__}
    row.update(defense=setting.name, strength=setting.strength)
    # the main task; the receiving party keeps the victims' activations of the last epoch
    main = build_defended_model(config, setting, data.private.num_classes, in_features, train_size=len(data.private))
    victim_acts: list[torch.Tensor | None] = [None] * victims

    def keep_victims(epoch: int, idx: torch.Tensor, act: torch.Tensor, grad: torch.Tensor) -> None:
        if epoch == config.epochs - 1:
            for r, i in enumerate(idx.tolist()):
                if i < victims:
                    victim_acts[i] = act[r]

    train_defended(main, data.private, config, keep_victims, desc=f"{setting.label}: main task")
    row["accuracy"] = main.model.evaluate(data.test).accuracy
    if setting.name == "dp":
        row["epsilon"] = main.epsilon(config.delta)
    elif setting.name == "label-dp":
        row["epsilon"] = setting.strength
    recon = torch.full((0, *data.private.features.shape[1:]), nan)
    truth = data.private.features[:victims]
    if {"inversion", "dcor", "unsplit"} & set(attacks):
        acts = torch.stack(victim_acts)  # type: ignore[arg-type]
    if "inversion" in attacks:  # the receiving party's decoder, trained on queries of the auxiliary sample
        aux_acts = query_cut_activations(main.model, data.aux.features)
        decoder = train_decoder(aux_acts, data.aux.features, config.inversion, progress=config.progress)
        recon = reconstruct(decoder, acts)
        inv = evaluate_reconstructions(recon, truth, data.private.labels[:victims], classifier)
        row.update(recon_mse=inv.mse, recon_ssim=inv.ssim, recon_accuracy=inv.classifier_accuracy)
    if "dcor" in attacks:  # model-free leakage
        row["dcor"] = float(distance_correlation(truth.double(), acts.double()))
    if "unsplit" in attacks:
        row["unsplit_mse"], row["unsplit_ssim"] = run_unsplit(config, acts, truth, data.private.num_classes)
    if "label-leakage" in attacks:  # the data holder reads the binary task's labels from her gradients
        train_bin, test_bin = binary
        attack = LabelLeakageAttack()
        labels = train_bin.labels
        side = build_defended_model(
            config, setting, 2, in_features, defense_seed=config.seed + 1, train_size=len(train_bin)
        )

        def observe(epoch: int, idx: torch.Tensor, act: torch.Tensor, grad: torch.Tensor) -> None:
            attack.observe(grad, labels[idx])

        train_defended(side, train_bin, config, observe, desc=f"{setting.label}: binary task")
        leak = attack.result()
        row.update(norm_auc=leak.norm_auc, cosine_auc=leak.cosine_auc)
        row["binary_accuracy"] = side.model.evaluate(test_bin).accuracy
    if "fsha" in attacks:
        row["fsha_mse"] = run_fsha(config, setting, data, in_features)
    if "model-completion" in attacks:
        row["completion_accuracy"] = run_completion(main.model, data)
    if "feature-inference" in attacks:
        row["feature_mse"] = run_feature_inference(config, setting, data)
    del row["accuracy_drop"]
    row["seconds"] = time.perf_counter() - start
    return row, recon[:GRID_SAMPLES]


def run_privacy_experiment(
    config: PrivacyConfig, settings: Sequence[DefenseSetting], *, data: PrivacyData | None = None
) -> PrivacyResult:
    """Train, attack and measure every setting (the undefended baseline is always included, first).

    ``data`` may be given to reuse loaded data (it must match ``config``).
    """
    settings = _with_baseline(settings)
    data = data if data is not None else load_privacy_data(config)
    if config.victims > len(data.private):
        raise ConfigurationError(f"victims ({config.victims}) cannot exceed the {len(data.private)} private samples")
    classifier = train_reference_classifier(
        data.aux.features, data.aux.labels, data.aux.num_classes, config.inversion, progress=config.progress
    )
    victims = data.private.features[: config.victims]
    with torch.no_grad():
        clean = float((classifier(victims).argmax(dim=1) == data.private.labels[: config.victims]).double().mean())
    binary = data.binary(config.positive_class)
    raw_rows, grids = [], {}
    for setting in tqdm(settings, desc="privacy", unit="setting", disable=not config.progress):
        row, grid = _run_setting(config, setting, data, classifier, binary)
        raw_rows.append(row)
        if grid.shape[0]:
            grids[setting.label] = grid
    base = raw_rows[0]["accuracy"]
    rows = [PrivacyRow(accuracy_drop=base - r["accuracy"], **r) for r in raw_rows]
    return PrivacyResult(config, rows, clean, 1.0 / data.private.num_classes, victims[:GRID_SAMPLES].clone(), grids)
