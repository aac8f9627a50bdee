"""Attacks run by a party on what it legitimately sees at the cut.

- :mod:`~splitnn.privacy.attacks.inversion`: the receiving party reconstructs the
  data holder's inputs from the activations it received (decoder trained on an
  auxiliary public sample).
- :mod:`~splitnn.privacy.attacks.label_leakage`: the data holder infers the label
  holder's labels from the gradients it receives (norm and direction attacks of
  arXiv 2102.08504).
- :mod:`~splitnn.privacy.attacks.fsha` (a malicious label holder), :mod:`~splitnn.privacy.attacks.completion`
  (model completion), :mod:`~splitnn.privacy.attacks.unsplit` (black-box inversion) and
  :mod:`~splitnn.privacy.attacks.feature_inference` (GRN, vertical) are imported from their modules.
"""

from splitnn.privacy.attacks.inversion import (
    InversionConfig,
    InversionResult,
    evaluate_reconstructions,
    reconstruct,
    train_decoder,
    train_reference_classifier,
)
from splitnn.privacy.attacks.label_leakage import LabelLeakageAttack, LabelLeakageResult, cosine_scores, norm_scores

__all__ = [
    "InversionConfig",
    "InversionResult",
    "train_decoder",
    "reconstruct",
    "evaluate_reconstructions",
    "train_reference_classifier",
    "LabelLeakageAttack",
    "LabelLeakageResult",
    "norm_scores",
    "cosine_scores",
]
