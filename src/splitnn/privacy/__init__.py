"""Privacy at the cut, measured: attacks that show what leaks, defenses that reduce it, and their cost.

Defenses (:mod:`splitnn.privacy.defenses`) are layers placed in the segment of the
party that applies them: :class:`NoPeek` and :class:`CutNoise` at the data holder,
:class:`LabelProtection` at the label holder. Attacks
(:mod:`splitnn.privacy.attacks`) use only what the attacking party sees at the
cut. :func:`run_privacy_experiment` trains with each defense setting, runs the
attacks and returns the trade-off table; :mod:`splitnn.privacy.report` writes it
as CSV / JSON / PNG.

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
from splitnn.privacy.defenses import (
    DEFENSE_NAMES,
    CutNoise,
    DefenseOptions,
    DefenseSetting,
    LabelProtection,
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
    "DEFENSE_NAMES",
    "DefenseSetting",
    "DefenseOptions",
    "apply_defense",
    "NoPeek",
    "CutNoise",
    "LabelProtection",
    "CutTap",
    "InversionConfig",
    "InversionResult",
    "train_decoder",
    "reconstruct",
    "evaluate_reconstructions",
    "train_reference_classifier",
    "LabelLeakageAttack",
    "LabelLeakageResult",
    "PrivacyConfig",
    "PrivacyData",
    "PrivacyRow",
    "PrivacyResult",
    "run_privacy_experiment",
    "load_privacy_data",
    "build_defended_model",
    "train_defended",
    "distance_correlation",
    "roc_auc",
    "AUCAccumulator",
    "ssim",
    "mse",
]
