"""In-memory datasets (features + labels) and the MNIST-family loader."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitnn.errors import ConfigurationError, CorruptDataError, DataError, LabelError

from .idx import read_idx
from .registry import get_dataset_info
from .resolve import resolve_split_files
from .sources import NamedFeatures, as_named_features

__all__ = ["FEATURE_DTYPES", "Dataset", "load_dataset", "normalize_images", "clear_cache"]

Indices = torch.Tensor | Sequence[int] | slice

#: the dtypes of a Dataset's features: values (float32) or token ids (int64)
FEATURE_DTYPES = (torch.float32, torch.int64)


@dataclass
class Dataset:
    """Features and labels of one dataset split, held in memory.

    Attributes:
        features: float32 tensor of shape (N, ...) (images are (N, C, H, W)), or int64 of shape
            (N, ...): token ids, e.g. (N, context) for a language model (:func:`splitnn.cut` with
            ``example=``). Or several named tensors, a mapping of names to such tensors (all N rows):
            a model's keyword inputs, e.g. ``{"input_ids": ids, "attention_mask": mask}``. A batch of
            named features is the tuple of their rows in the mapping's order, which the first segment
            takes as its positional inputs; a segment made by :func:`splitnn.cut` (``example=`` a dict)
            names its inputs, and the names must be those of the example in the same order (checked
            when the dataset is placed). ``features`` then holds a
            :class:`~splitnn.data.sources.NamedFeatures` (a ``dict``).
        labels: int64 class labels of shape (N,) (or (N, ...) for one class per position),
            values in ``[0, num_classes)``; or floating-point targets of shape (N, ...):
            binary or multi-label 0/1 targets, probabilities, regression values.
        name: dataset name, e.g. ``"mnist"`` (informational).
        num_classes: number of classes of integer labels (optional; float targets have none).

    Numpy arrays are accepted for features and labels (converted without copying).
    Whether the labels suit the loss and the model is checked when a model prepares
    the dataset (:func:`splitnn.workers.losses.check_labels`).

    Raises (on construction):
        DataError: not tensors, wrong dtype/rank, N differs, or N == 0; for named features also an empty
            mapping, a name that is not a non-empty string, or an entry of its own wrong dtype/rank/N
            (the error names it).
        LabelError: a label is outside ``[0, num_classes)``, or a float target is not finite.
    """

    features: torch.Tensor | Mapping[str, torch.Tensor]
    labels: torch.Tensor
    name: str = "data"
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.features, np.ndarray):
            self.features = torch.from_numpy(self.features)
        if isinstance(self.labels, np.ndarray):
            self.labels = torch.from_numpy(self.labels)
        if isinstance(self.features, Mapping):
            self.features = as_named_features(self.features, f"Dataset {self.name!r}")
            for key, t in self.features.items():
                self._check_features(t, f" feature {key!r}")
            f = next(iter(self.features.values()))
        else:
            f = self.features
        y = self.labels
        if not isinstance(f, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise DataError(
                f"Dataset {self.name!r}: features and labels must be torch.Tensors or numpy arrays, "
                f"got {type(f).__name__} and {type(y).__name__}"
            )
        self._check_features(f, "")
        if y.is_floating_point():
            if y.dim() < 1:
                raise DataError(f"Dataset {self.name!r}: float targets must have shape (N, ...), got a scalar")
        elif y.dtype != torch.int64 or y.dim() < 1:
            raise DataError(
                f"Dataset {self.name!r}: labels must be int64 class labels of shape (N,) or float targets, "
                f"got {y.dtype} of shape {tuple(y.shape)}; convert class labels with .long().flatten(), "
                f"targets with .float()"
            )
        if f.shape[0] != y.shape[0]:
            raise DataError(
                f"Dataset {self.name!r}: {f.shape[0]} feature rows but {y.shape[0]} "
                f"labels; they must be the same samples"
            )
        if y.shape[0] == 0:
            raise DataError(f"Dataset {self.name!r} is empty (0 samples)")
        if y.is_floating_point():
            if self.num_classes is not None:
                raise DataError(
                    f"Dataset {self.name!r}: num_classes describes integer class labels, but the labels are "
                    f"{y.dtype} targets; drop num_classes (or give class labels as .long())"
                )
            if not bool(torch.isfinite(y).all()):
                raise LabelError(f"Dataset {self.name!r}: the targets contain NaN or infinite values")
            return
        if self.num_classes is not None and (
            isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1
        ):
            raise DataError(f"Dataset {self.name!r}: num_classes must be a positive int, got {self.num_classes!r}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or (self.num_classes is not None and hi >= self.num_classes):
            bad = lo if lo < 0 else hi
            raise LabelError(
                f"Dataset {self.name!r}: label {bad} is outside [0, {self.num_classes or 'C'}); "
                f"labels range over [{lo}, {hi}]. Check num_classes or the label file"
            )

    def _check_features(self, f: object, which: str) -> None:
        if isinstance(f, torch.Tensor) and (f.dtype not in FEATURE_DTYPES or f.dim() < 2):
            raise DataError(
                f"Dataset {self.name!r}:{which or ' features'} must be float32 (or int64 token ids) of shape "
                f"(N, ...), got {f.dtype} of shape {tuple(f.shape)}; convert values with .float(), ids with .long()"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def named(self) -> bool:
        """Whether the features are several named tensors (a mapping) rather than one tensor."""
        return isinstance(self.features, NamedFeatures)

    def feature_tensor(self, what: str) -> torch.Tensor:
        """The one feature tensor, for ``what`` (a function or topology that takes one); a ConfigurationError
        naming ``what``, the dataset and its feature names when the features are several named tensors."""
        return one_feature_tensor(self.features, self.name, what)

    def subset(self, indices: Indices) -> Dataset:
        """Return a new Dataset with the samples at ``indices`` (tensor, sequence of ints, or slice).

        Raises:
            DataError: an index is out of range, or the subset is empty.
        """
        if isinstance(indices, slice):
            return Dataset(_rows(self.features, indices), self.labels[indices], self.name, self.num_classes)
        idx = torch.as_tensor(indices, dtype=torch.int64).flatten()
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise DataError(
                f"Dataset {self.name!r}: subset index out of range for {n} samples "
                f"(min {int(idx.min())}, max {int(idx.max())})"
            )
        return Dataset(_rows(self.features, idx), self.labels[idx], self.name, self.num_classes)


def one_feature_tensor(features: torch.Tensor | NamedFeatures, dataset: str, what: str) -> torch.Tensor:
    """``features`` when they are one tensor; a ConfigurationError naming ``what`` (a function or topology that
    takes one), ``dataset`` and the feature names when they are several named tensors."""
    if isinstance(features, NamedFeatures):
        raise ConfigurationError(
            f"{what} takes one feature tensor; dataset {dataset!r} has named features "
            f"({', '.join(features)}). Named features train with splitnn.fit on a chain of segments "
            f"(SplitNN, UShapedSplitNN); give {what} a Dataset of one tensor"
        )
    return features


def _rows(features: torch.Tensor | NamedFeatures, idx: torch.Tensor | slice) -> torch.Tensor | NamedFeatures:
    if isinstance(features, NamedFeatures):
        return NamedFeatures((k, t[idx]) for k, t in features.items())
    return features[idx]


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W): ``x / 255`` then ``(x - 0.5) / 0.5``.

    Exactly torchvision's ``ToTensor()`` followed by ``Normalize((0.5,), (0.5,))``
    (the PySyft split-learning tutorial's transform); values lie in [-1, 1].
    """
    x = images.to(torch.float32).div_(255)
    x.sub_(0.5).div_(0.5)
    return x.unsqueeze(1) if x.dim() == 3 else x


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, size: int, mtime_ns: int) -> torch.Tensor:
    return read_idx(path)


def _read(path: Path) -> torch.Tensor:
    st = path.stat()
    return _read_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


def clear_cache() -> None:
    """Forget the IDX files cached in this process."""
    _read_cached.cache_clear()


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: bool = True,
    limit: int | None = None,
    mirrors: Sequence[str] | None = None,
) -> Dataset:
    """Load an MNIST-family split as a :class:`Dataset` (features (N, 1, 28, 28) in [-1, 1]).

    Files are located (or downloaded) by :func:`resolve_split_files`. ``limit`` keeps
    the first ``limit`` samples (all if the split has fewer). The decoded files are
    cached in-process keyed by path, size and mtime; every call returns fresh tensors.

    Raises:
        ConfigurationError: unknown name or split, or ``limit`` < 1.
        DatasetNotFoundError, DownloadError, ChecksumError: see resolve_split_files.
        CorruptDataError: malformed IDX, unexpected shapes, or image/label counts differ.
        LabelError: a label outside ``[0, num_classes)``.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigurationError(f"limit must be a positive int or None, got {limit!r}")
    info = get_dataset_info(name)
    img_path, lab_path = resolve_split_files(
        info.name, split, data_dir=data_dir, download=download, progress=progress, mirrors=mirrors
    )
    images, labels = _read(img_path), _read(lab_path)
    c, h, w = info.image_shape
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (h, w):
        raise CorruptDataError(
            f"{img_path}: expected uint8 images of shape (N, {h}, {w}), got "
            f"{images.dtype} {tuple(images.shape)}; delete it and re-download"
        )
    if labels.dim() != 1 or labels.dtype.is_floating_point:
        raise CorruptDataError(
            f"{lab_path}: expected integer labels of shape (N,), got "
            f"{labels.dtype} {tuple(labels.shape)}; delete it and re-download"
        )
    if images.shape[0] != labels.shape[0]:
        raise CorruptDataError(
            f"{info.name} {split}: {img_path} has {images.shape[0]} images but "
            f"{lab_path} has {labels.shape[0]} labels; the files do not belong "
            f"together: delete both and re-download"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return Dataset(normalize_images(images), labels.to(torch.int64), info.name, info.num_classes)
