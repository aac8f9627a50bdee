"""Per-feature standardisation of a data holder's own features (image pixels, table columns).

A data holder standardises with statistics of its own training rows; nothing leaves it. Besides
the usual gain in conditioning, this matters for pipelined training
(``fit(..., pipeline=K)``): a gradient applied K - 1 updates after its forward tolerates a
much smaller step along the input's sharpest direction, and uncentred inputs (images in
[-1, 1] average -0.43 per pixel on Fashion-MNIST) make that direction very sharp at the
first layer. See the performance docs' pipelining section for the measured effect.
"""

from __future__ import annotations

from splitnn.data.dataset import Dataset
from splitnn.errors import DataError

__all__ = ["standardize"]


def standardize(train: Dataset, *others: Dataset, min_std: float = 1e-2) -> list[Dataset]:
    """``train`` and ``others`` with every feature shifted by ``train``'s mean and divided by its
    (population) standard deviation, floored at ``min_std`` so that a feature almost constant in
    ``train`` (a border pixel) is not blown up. Returns new Datasets: ``[train, *others]``.

    Raises:
        DataError: ``min_std`` is not positive, or another dataset's features differ in shape.
        ConfigurationError: a dataset's features are several named tensors (standardise each one yourself).
    """
    if not min_std > 0:
        raise DataError(f"standardize: min_std must be positive, got {min_std!r}")
    for d in (train, *others):
        d.feature_tensor("standardize")  # ConfigurationError naming the dataset's named features
    shape = train.features.shape[1:]
    for d in others:
        if d.features.shape[1:] != shape:
            raise DataError(
                f"standardize: dataset {d.name!r} has features of shape {tuple(d.features.shape[1:])}, "
                f"{train.name!r} of {tuple(shape)}; standardise datasets of the same features"
            )
    x = train.features.double()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(min_std)
    return [
        Dataset(((d.features.double() - mean) / std).float(), d.labels, d.name, d.num_classes) for d in (train, *others)
    ]
