"""The privacy experiment's configuration and data: what runs, on which samples.

Data: private training set = the first ``train_size`` samples of the training
split; auxiliary public sample = its last ``aux_size`` samples (disjoint);
test set = the first ``test_size`` samples of the test split.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from splitnn.checks import check_positive
from splitnn.data import Dataset, load_dataset
from splitnn.errors import ConfigurationError
from splitnn.privacy.attacks.inversion import InversionConfig
from splitnn.privacy.defenses import DefenseOptions

__all__ = ["ATTACK_NAMES", "PrivacyConfig", "PrivacyData", "load_privacy_data"]

#: Attacks an experiment can run, by name (see :class:`PrivacyConfig`).
ATTACK_NAMES = ("inversion", "label-leakage", "dcor", "fsha", "model-completion", "unsplit", "feature-inference")


@dataclass(frozen=True)
class PrivacyConfig:
    """Everything an experiment needs besides the defense settings.

    Attributes:
        dataset, data_dir, download: where the data comes from (see :func:`splitnn.data.load_dataset`).
        train_size: private training samples (``None``: every sample not in the auxiliary sample).
        aux_size: the attacker's auxiliary public sample, taken from the end of the training split.
        test_size: test samples (``None``: the whole test split).
        victims: private samples whose reconstruction and distance correlation are measured.
        hidden: hidden layer sizes of the tutorial MLP (one segment per layer).
        workers: one party name per segment; the first party's segments end at the cut,
            the last party holds the labels. Consecutive segments of one party are merged.
        epochs, batch_size, lr: SGD training of the split network.
        seed: initial weights, data order, and (offset) the defenses' own generators.
        positive_class: the class that is "positive" in the binary label-leakage task.
        clip: the per-sample activation norm bound C of the ``noise`` defense.
        label_directions: principal directions that receive noise in the ``label`` defense.
        delta: the delta of the ``dp`` defense's (epsilon, delta) budget.
        dp_clip: the ``dp`` defense's per-example gradient norm bound.
        inversion: decoder / reference classifier training.
        attacks: which attacks run (names of :data:`ATTACK_NAMES`); the columns of the others are NaN.
        fsha_steps: training steps of the FSHA attacker (the ``fsha`` attack).
        unsplit_rounds: alternations of the ``unsplit`` attacker (input steps, then surrogate steps).
        feature_epochs: epochs of the ``feature-inference`` attacker's generator.
        progress: show progress bars.
    """

    dataset: str = "fashion-mnist"
    data_dir: Path | None = None
    download: bool = True
    train_size: int | None = 10_000
    aux_size: int = 5_000
    test_size: int | None = None
    victims: int = 1_000
    hidden: tuple[int, ...] = (128, 640)
    workers: tuple[str, ...] = ("alice", "bob", "bob")
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.05
    seed: int = 0
    positive_class: int = 0
    clip: float = 4.0
    label_directions: int = 1
    delta: float = 1e-5
    dp_clip: float = 1.0
    inversion: InversionConfig = field(default_factory=InversionConfig)
    attacks: tuple[str, ...] = ("inversion", "label-leakage", "dcor")
    fsha_steps: int = 500
    unsplit_rounds: int = 50
    feature_epochs: int = 100
    progress: bool = False

    def __post_init__(self) -> None:
        check_positive("train_size", self.train_size, optional=True)
        check_positive("test_size", self.test_size, optional=True)
        for name in ("aux_size", "victims", "epochs", "batch_size"):
            check_positive(name, getattr(self, name))
        if self.victims < 2:
            raise ConfigurationError("victims must be at least 2 (distance correlation needs pairs)")
        if self.train_size is not None and self.victims > self.train_size:
            raise ConfigurationError(f"victims ({self.victims}) cannot exceed train_size ({self.train_size})")
        if not self.hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ConfigurationError(f"hidden must be positive layer sizes, got {self.hidden!r}")
        if len(self.workers) != len(self.hidden) + 1:
            raise ConfigurationError(
                f"workers names {len(self.workers)} parties for {len(self.hidden) + 1} segments "
                f"(hidden {list(self.hidden)}); give one worker per segment"
            )
        if any(not isinstance(w, str) or not w for w in self.workers):
            raise ConfigurationError(f"worker names must be non-empty strings, got {self.workers!r}")
        parties = [w for i, w in enumerate(self.workers) if i == 0 or w != self.workers[i - 1]]
        if len(parties) < 2:
            raise ConfigurationError(
                f"workers {list(self.workers)} put every segment at one party; a privacy "
                f"experiment needs a cut between two parties"
            )
        if len(set(parties)) != len(parties):
            raise ConfigurationError(
                f"workers {list(self.workers)}: a party hosts two separate runs of segments; "
                f"give each party consecutive segments"
            )
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ConfigurationError(f"lr must be a positive number, got {self.lr!r}")
        if isinstance(self.positive_class, bool) or not isinstance(self.positive_class, int) or self.positive_class < 0:
            raise ConfigurationError(f"positive_class must be a class index >= 0, got {self.positive_class!r}")
        self.defense_options()  # validates clip and label_directions
        unknown = [a for a in self.attacks if a not in ATTACK_NAMES]
        if unknown or not self.attacks:
            raise ConfigurationError(
                f"attacks: unknown or no attack {unknown[:1] or list(self.attacks)}; "
                f"choose among {', '.join(ATTACK_NAMES)}"
            )
        for name in ("fsha_steps", "unsplit_rounds", "feature_epochs"):
            check_positive(name, getattr(self, name))
        if not isinstance(self.inversion, InversionConfig):
            raise ConfigurationError("inversion must be an InversionConfig")

    def defense_options(self, seed: int | None = None, *, sample_rate: float | None = None) -> DefenseOptions:
        """The options every defense of this experiment uses (``seed``: of their random streams;
        ``sample_rate``: batch size / training set size, for ``dp``)."""
        return DefenseOptions(
            clip=self.clip,
            label_directions=self.label_directions,
            seed=self.seed if seed is None else seed,
            delta=self.delta,
            sample_rate=sample_rate,
            epochs=self.epochs,
            dp_clip=self.dp_clip,
        )

    def to_dict(self) -> dict:
        """JSON-friendly view of the configuration."""
        d = asdict(self)
        d["data_dir"] = None if self.data_dir is None else str(self.data_dir)
        d["hidden"], d["workers"], d["attacks"] = list(self.hidden), list(self.workers), list(self.attacks)
        return d


@dataclass(frozen=True)
class PrivacyData:
    """The three samples of an experiment: private training data, the attacker's auxiliary sample, test data."""

    private: Dataset
    aux: Dataset
    test: Dataset

    def binary(self, positive_class: int) -> tuple[Dataset, Dataset]:
        """Private and test sets relabelled ``positive_class`` -> 1, every other class -> 0."""

        def relabel(d: Dataset) -> Dataset:
            return Dataset(d.features, (d.labels == positive_class).long(), f"{d.name}-{positive_class}-vs-rest", 2)

        return relabel(self.private), relabel(self.test)


def load_privacy_data(config: PrivacyConfig) -> PrivacyData:
    """Load and split the data of ``config``; raises before any training if the sizes do not fit."""
    load = dict(data_dir=config.data_dir, download=config.download, progress=config.progress)
    train = load_dataset(config.dataset, "train", **load)
    test = load_dataset(config.dataset, "test", limit=config.test_size, **load)
    n = len(train)
    train_size = config.train_size if config.train_size is not None else n - config.aux_size
    if train_size < 1 or train_size + config.aux_size > n:
        raise ConfigurationError(
            f"{config.dataset} has {n} training samples: not enough for {train_size} private "
            f"and {config.aux_size} auxiliary samples without overlap; lower train_size or aux_size"
        )
    if config.victims > train_size:
        raise ConfigurationError(f"victims ({config.victims}) cannot exceed the {train_size} private samples")
    if config.positive_class >= train.num_classes:
        raise ConfigurationError(
            f"positive_class {config.positive_class} is not a class of {config.dataset} (0..{train.num_classes - 1})"
        )
    return PrivacyData(train.subset(slice(0, train_size)), train.subset(slice(n - config.aux_size, n)), test)
