"""The privacy experiment: train with each defense setting, attack, and tabulate leakage against accuracy.

For every :class:`~splitnn.privacy.defenses.DefenseSetting` (the undefended
baseline first) :func:`run_privacy_experiment`:

1. trains the split network on the main task (all classes) with the defense in
   place, recording the activations the receiving party got for the *victim*
   samples (the first ``victims`` private training samples) in the last epoch;
   measures test accuracy (defenses active as in deployment);
2. **inversion**: the receiving party queries the data holder's trained segment
   on its auxiliary public sample, trains a decoder activations -> inputs, and
   reconstructs the victims; MSE, SSIM and a clean-data classifier's accuracy on
   the reconstructions;
3. **distance correlation** between the victims' raw inputs and their activations;
4. trains the same network, with the same defense, on a binary imbalanced task
   (``positive_class`` against the rest) and runs the **norm and direction label
   attacks** on every gradient the data holder received (ROC AUC).

Every setting starts from the same initial weights and data order (``seed``);
defenses draw from their own seeded generators, so strength 0 reproduces the
baseline exactly.

Data: private training set = the first ``train_size`` samples of the training
split; auxiliary public sample = its last ``aux_size`` samples (disjoint);
test set = the first ``test_size`` samples of the test split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from splitnn.data import Dataset, load_dataset
from splitnn.data.batching import epoch_batches
from splitnn.errors import ConfigurationError
from splitnn.models import tutorial_mlp
from splitnn.privacy.attacks.inversion import (
    InversionConfig,
    evaluate_reconstructions,
    reconstruct,
    train_decoder,
    train_reference_classifier,
)
from splitnn.privacy.attacks.label_leakage import LabelLeakageAttack
from splitnn.privacy.defenses import (
    DefenseOptions,
    DefenseSetting,
    DPSegment,
    Marvell,
    apply_defense,
    defend_labels,
    defense_loss,
)
from splitnn.privacy.metrics import distance_correlation
from splitnn.privacy.tap import CutTap
from splitnn.split import SplitNN
from splitnn.workers import BatchRef, VirtualWorker

__all__ = [
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

#: Attacks an experiment can run, by name (see :class:`PrivacyConfig`).
ATTACK_NAMES = ("inversion", "label-leakage", "dcor", "fsha", "model-completion")


def _positive_int(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")


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
    progress: bool = False

    def __post_init__(self) -> None:
        _positive_int("train_size", self.train_size, allow_none=True)
        _positive_int("test_size", self.test_size, allow_none=True)
        for name in ("aux_size", "victims", "epochs", "batch_size"):
            _positive_int(name, getattr(self, name))
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
        _positive_int("fsha_steps", self.fsha_steps)
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
    sample). Columns of attacks that did not run are NaN.
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
    victims = config.victims
    # 1. main task; the receiving party keeps the victims' activations of the last epoch
    main = build_defended_model(config, setting, data.private.num_classes, in_features, train_size=len(data.private))
    victim_acts: list[torch.Tensor | None] = [None] * victims

    def keep_victims(epoch: int, idx: torch.Tensor, act: torch.Tensor, grad: torch.Tensor) -> None:
        if epoch == config.epochs - 1:
            for row, i in enumerate(idx.tolist()):
                if i < victims:
                    victim_acts[i] = act[row]

    train_defended(main, data.private, config, keep_victims, desc=f"{setting.label}: main task")
    accuracy = main.model.evaluate(data.test).accuracy
    epsilon = (
        main.epsilon(config.delta)
        if setting.name == "dp"
        else (setting.strength if setting.name == "label-dp" else math.nan)
    )
    nan = math.nan
    recon_mse = recon_ssim = recon_acc = dcor = nan
    recon = torch.full((0, *data.private.features.shape[1:]), nan)
    if "inversion" in config.attacks or "dcor" in config.attacks:
        acts = torch.stack(victim_acts)  # type: ignore[arg-type]
        truth = data.private.features[:victims]
    if "inversion" in config.attacks:
        # 2. inversion by the receiving party
        aux_acts = query_cut_activations(main.model, data.aux.features)
        decoder = train_decoder(aux_acts, data.aux.features, config.inversion, progress=config.progress)
        recon = reconstruct(decoder, acts)
        inv = evaluate_reconstructions(recon, truth, data.private.labels[:victims], classifier)
        recon_mse, recon_ssim, recon_acc = inv.mse, inv.ssim, inv.classifier_accuracy
    if "dcor" in config.attacks:
        # 3. model-free leakage
        dcor = float(distance_correlation(truth.double(), acts.double()))
    norm_auc = cosine_auc = binary_accuracy = nan
    if "label-leakage" in config.attacks:
        # 4. label leakage on the binary task
        train_bin, test_bin = binary
        attack = LabelLeakageAttack()
        labels = train_bin.labels
        side = build_defended_model(
            config, setting, 2, in_features, defense_seed=config.seed + 1, train_size=len(train_bin)
        )
        train_defended(
            side,
            train_bin,
            config,
            lambda e, idx, a, g: attack.observe(g, labels[idx]),
            desc=f"{setting.label}: binary task",
        )
        leak = attack.result()
        norm_auc, cosine_auc = leak.norm_auc, leak.cosine_auc
        binary_accuracy = side.model.evaluate(test_bin).accuracy
    fsha_mse = _run_fsha(config, setting, data, in_features) if "fsha" in config.attacks else nan
    completion = nan
    if "model-completion" in config.attacks:
        # 6. model completion by the data holder: its own segment's outputs, 4 known labels per class
        from splitnn.privacy.attacks.completion import ModelCompletion, few_labels

        known = few_labels(data.aux.labels, 4, data.aux.num_classes)
        head = ModelCompletion(data.aux.num_classes).fit(
            query_cut_activations(main.model, data.aux.features[known]), data.aux.labels[known]
        )
        completion = head.accuracy(query_cut_activations(main.model, data.test.features), data.test.labels)
    row = dict(
        defense=setting.name,
        strength=setting.strength,
        accuracy=accuracy,
        recon_mse=recon_mse,
        recon_ssim=recon_ssim,
        recon_accuracy=recon_acc,
        norm_auc=norm_auc,
        cosine_auc=cosine_auc,
        dcor=dcor,
        binary_accuracy=binary_accuracy,
        epsilon=epsilon,
        fsha_mse=fsha_mse,
        completion_accuracy=completion,
        seconds=time.perf_counter() - start,
    )
    return row, recon[:GRID_SAMPLES]


def _run_fsha(config: PrivacyConfig, setting: DefenseSetting, data: PrivacyData, in_features: int) -> float:
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
