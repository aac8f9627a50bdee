"""Privacy at the cut, measured: attacks that show what leaks, defenses that reduce it, and their cost.

Defenses (:mod:`splitnn.privacy.defenses`) are layers placed in the segment of the party that applies them:
:class:`NoPeek`, :class:`CutNoise` and :class:`DPSegment` (DP-SGD with opacus's accountant) at the data holder;
:class:`LabelProtection`, :class:`Marvell` and :class:`MIDLayer` at the label holder; :class:`LabelDP` randomizes
the label holder's training labels. The active attack :class:`FSHA` drives the data holder's party through the
worker protocol; :class:`ModelCompletion` is the data holder's label inference from its own trained segment;
:class:`UnSplit` inverts the cut knowing only the data holder's architecture; :class:`FeatureInference` is the label
party's generator against another holder's features (vertical). Attacks (:mod:`splitnn.privacy.attacks`) use only
what the attacking party sees at the cut. :func:`run_privacy_experiment` trains with each defense setting, runs the
attacks and returns the trade-off table; :mod:`splitnn.privacy.report` writes it as CSV / JSON / PNG.

>>> from splitnn.privacy import PrivacyConfig, DefenseSetting, run_privacy_experiment
>>> result = run_privacy_experiment(PrivacyConfig(train_size=5000),        # doctest: +SKIP
...                                 [DefenseSetting("nopeek", 1.0), DefenseSetting("noise", 0.5)])
"""

from splitnn.privacy.attacks import (
    InversionConfig,
    InversionResult,
    LabelLeakageAttack,
    LabelLeakageResult,
    evaluate_reconstructions,
    reconstruct,
    train_decoder,
    train_reference_classifier,
)
from splitnn.privacy.attacks.completion import ModelCompletion, ModelCompletionConfig, few_labels
from splitnn.privacy.attacks.feature_inference import FeatureInference, FeatureInferenceConfig
from splitnn.privacy.attacks.fsha import FSHA, FSHAConfig, FSHAResult
from splitnn.privacy.attacks.unsplit import UnSplit, UnSplitConfig, UnSplitResult
from splitnn.privacy.defenses import (
    DEFENSE_NAMES,
    CutNoise,
    DefenseOptions,
    DefenseSetting,
    DPSegment,
    LabelDP,
    LabelProtection,
    Marvell,
    MIDLayer,
    NoPeek,
    apply_defense,
)
from splitnn.privacy.experiment import (
    PrivacyConfig,
    PrivacyData,
    PrivacyResult,
    PrivacyRow,
    build_defended_model,
    load_privacy_data,
    run_privacy_experiment,
    train_defended,
)
from splitnn.privacy.metrics import AUCAccumulator, distance_correlation, mse, roc_auc, ssim
from splitnn.privacy.tap import CutTap

__all__ = [
    "apply_defense",
    "AUCAccumulator",
    "build_defended_model",
    "CutNoise",
    "CutTap",
    "DEFENSE_NAMES",
    "DefenseOptions",
    "DefenseSetting",
    "distance_correlation",
    "DPSegment",
    "evaluate_reconstructions",
    "FeatureInference",
    "FeatureInferenceConfig",
    "few_labels",
    "FSHA",
    "FSHAConfig",
    "FSHAResult",
    "InversionConfig",
    "InversionResult",
    "LabelDP",
    "LabelLeakageAttack",
    "LabelLeakageResult",
    "LabelProtection",
    "load_privacy_data",
    "Marvell",
    "MIDLayer",
    "ModelCompletion",
    "ModelCompletionConfig",
    "mse",
    "NoPeek",
    "PrivacyConfig",
    "PrivacyData",
    "PrivacyResult",
    "PrivacyRow",
    "reconstruct",
    "roc_auc",
    "run_privacy_experiment",
    "ssim",
    "train_decoder",
    "train_defended",
    "train_reference_classifier",
    "UnSplit",
    "UnSplitConfig",
    "UnSplitResult",
]
