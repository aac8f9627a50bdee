"""Registry of the datasets splitnn knows how to find, verify and download."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitnn.errors import ConfigurationError

__all__ = ["DatasetInfo", "DATASETS", "SPLITS", "get_dataset_info"]

#: The split names every registered dataset provides.
SPLITS: tuple[str, ...] = ("train", "test")

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of an IDX dataset.

    Attributes:
        name: registry key, e.g. ``"mnist"``.
        files: split -> (images file name, labels file name), as published (gzipped).
        sha256: file name -> SHA-256 hex digest of the published ``.gz`` file.
        mirrors: base URLs (ending in ``/``) tried in order when downloading.
        num_classes: number of label classes.
        classes: human-readable class names (index = label), if known.
        system_dirs: directories where an OS package may have installed the files.
        image_shape: per-sample shape (C, H, W) after loading.
    """

    name: str
    files: dict[str, tuple[str, str]]
    sha256: dict[str, str]
    mirrors: tuple[str, ...]
    num_classes: int
    classes: tuple[str, ...] | None = None
    system_dirs: tuple[str, ...] = ()
    image_shape: tuple[int, int, int] = field(default=(1, 28, 28))

    def split_files(self, split: str) -> tuple[str, str]:
        """Return (images, labels) file names of ``split``; raise a clear error for unknown splits."""
        try:
            return self.files[split]
        except KeyError:
            raise ConfigurationError(
                f"dataset {self.name!r} has no split {split!r}; known splits: {sorted(self.files)}"
            ) from None


def _mnist_like(name: str, sums: tuple[str, str, str, str], mirrors: tuple[str, ...], **more) -> DatasetInfo:
    """An MNIST-format dataset: its four files (train/test images/labels) with their SHA-256 sums, in that
    order, and 10 classes of 28x28 grey images."""
    sha256 = dict(zip((file for pair in _MNIST_FILES.values() for file in pair), sums, strict=True))
    return DatasetInfo(name=name, files=dict(_MNIST_FILES), sha256=sha256, mirrors=mirrors, num_classes=10, **more)


DATASETS: dict[str, DatasetInfo] = {
    "mnist": _mnist_like(
        "mnist",
        # train sums: as published by torchvision / tensorflow-datasets registries.
        (
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        classes=tuple(str(d) for d in range(10)),
    ),
    "fashion-mnist": _mnist_like(
        "fashion-mnist",
        (
            "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        ),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        # Debian's dataset-fashion-mnist package installs the .gz files here.
        system_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
}


def get_dataset_info(name: str) -> DatasetInfo:
    """Return the registry entry of ``name`` (case-insensitive; ``_`` and ``-`` are equivalent).

    Raises:
        ConfigurationError: unknown name; the message lists the known names.
    """
    key = name.strip().lower().replace("_", "-")
    if key == "fashionmnist":
        key = "fashion-mnist"
    try:
        return DATASETS[key]
    except KeyError:
        raise ConfigurationError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}") from None
