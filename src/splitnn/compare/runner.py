"""Run split learning, SplitFed, FedAvg and large-batch SGD for a list of client counts, and measure them.

:class:`CompareConfig` says what to run, :func:`run_comparison` runs every method at every client count
from the same initial weights and shards (what each measures: its docstring), :class:`RunResult` holds
one run's bytes, FLOPs and seconds per client, accuracy and wall time.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from splitnn.accounting import Ledger
from splitnn.accounting.flops import ComputeMeter
from splitnn.compare.analytic import METHODS, SPLITFED_METHODS, CommModel, client_bytes
from splitnn.data import Dataset, parse_partition
from splitnn.errors import ConfigurationError
from splitnn.models import tutorial_mlp, vgg_cnn
from splitnn.training.baselines import FedAvg, LargeBatchSGD, evaluate_module
from splitnn.training.topologies import MultiHolderSplitNN, SplitFedSplitNN
from splitnn.workers import VirtualWorker
from splitnn.workers.optimizers import build_optimizer

__all__ = [
    "METHODS",
    "MODELS",
    "DEFAULT_LR",
    "CompareConfig",
    "RunResult",
    "build_model",
    "make_shards",
    "measured_client_bytes",
    "run_method",
    "run_comparison",
]

#: Models the comparison knows, by name.
MODELS = ("mlp", "vgg")

#: Default SGD learning rate of each model.
DEFAULT_LR = {"mlp": 0.03, "vgg": 0.02}

SERVER = "server"


def build_model(name: str, sample_shape: Sequence[int], classes: int) -> tuple[nn.Module, nn.Module]:
    """(client segment, server segment) of model ``name`` for samples of ``sample_shape``.

    ``mlp``: the tutorial's 784-128-640-10 network cut after its first layer
    (128 values at the cut). ``vgg``: :func:`splitnn.models.vgg_cnn`, cut after
    its first convolutional block.
    """
    if name == "mlp":
        first, *rest = tutorial_mlp(in_features=int(torch.tensor(sample_shape).prod()), classes=classes)
        return first, nn.Sequential(*rest)
    if name == "vgg":
        if len(sample_shape) != 3:
            raise ConfigurationError(f"the vgg model needs image samples (C, H, W), got shape {tuple(sample_shape)}")
        client, server = vgg_cnn(channels=sample_shape[0], classes=classes)
        return client, server
    raise ConfigurationError(f"unknown model {name!r}; choose one of {MODELS}")


@dataclass(frozen=True)
class CompareConfig:
    """What to compare. ``lr=None`` takes the model's default (:data:`DEFAULT_LR`)."""

    model: str = "mlp"
    clients: tuple[int, ...] = (1, 2, 4)
    epochs: int = 1
    local_epochs: int = 1
    batch_size: int = 64
    lr: float | None = None
    partition: str = "iid"
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    count_flops: bool = True

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigurationError(f"unknown model {self.model!r}; choose one of {MODELS}")
        clients = tuple(self.clients)
        if not clients or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in clients):
            raise ConfigurationError(f"client counts must be positive integers, got {self.clients!r}")
        object.__setattr__(self, "clients", tuple(sorted(set(clients))))
        for name in ("epochs", "local_epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
        if "fedavg" in self.methods and self.epochs % self.local_epochs:
            raise ConfigurationError(
                f"FedAvg runs epochs / local_epochs rounds: {self.epochs} epochs are not a "
                f"multiple of {self.local_epochs} local epochs"
            )
        object.__setattr__(self, "methods", tuple(self.methods))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigurationError(f"unknown methods {unknown}; choose from {METHODS}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigurationError(f"lr must be > 0, got {self.lr!r}")
        parse_partition(self.partition)  # raises a ConfigurationError for a bad spec

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.model]

    @property
    def optimizer(self) -> str:
        return f"sgd:lr={self.learning_rate}"


#: What :meth:`RunResult.to_dict` adds to the fields, in order.
_DERIVED = ("bytes_per_client", "predicted_bytes_per_client", "matches_model", "flops_per_client", "seconds_per_client")


class _PerClient:
    """A read-only attribute of a :class:`RunResult`: the mean over its clients of one per-client list field."""

    def __init__(self, field_name: str, doc: str) -> None:
        self.field_name = field_name
        self.__doc__ = doc

    def __get__(self, result: RunResult | None, owner: type) -> float:
        if result is None:
            return self  # type: ignore[return-value]  # the class's attribute: the descriptor (for its doc)
        return sum(getattr(result, self.field_name)) / result.clients


@dataclass
class RunResult:
    """One method at one client count: measured and predicted bytes, FLOPs, time, accuracy."""

    method: str
    clients: int
    client_bytes: list[int]
    predicted_client_bytes: list[int]
    client_flops: list[int]
    client_seconds: list[float]
    accuracy: float
    test_loss: float
    wall_seconds: float
    train_samples: int
    epochs: int
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    predicted_bytes_by_kind: dict[str, int] = field(default_factory=dict)
    compute: dict[str, dict[str, float]] = field(default_factory=dict)

    bytes_per_client = _PerClient("client_bytes", "Mean measured bytes (sent + received) per client.")
    predicted_bytes_per_client = _PerClient("predicted_client_bytes", "Mean bytes per client of the analytic model.")
    flops_per_client = _PerClient("client_flops", "Mean FLOPs (forward + backward + optimizer) per client.")
    seconds_per_client = _PerClient("client_seconds", "Mean seconds each client spent in its calls.")

    @property
    def matches_model(self) -> bool:
        """Whether every client's measured bytes equal the analytic model's, to the byte."""
        return self.client_bytes == self.predicted_client_bytes and self.bytes_by_kind == self.predicted_bytes_by_kind

    def to_dict(self) -> dict[str, object]:
        """Every field plus the derived means, for JSON."""
        return {**asdict(self), **{name: getattr(self, name) for name in _DERIVED}}


def make_shards(data: Dataset, clients: int, partition: str, seed: int) -> list[torch.Tensor]:
    """Sorted index shards of ``data`` for ``clients`` clients (the same for every method)."""
    if clients > len(data):
        raise ConfigurationError(
            f"{clients} clients but only {len(data)} training samples; use fewer clients or more data"
        )
    return [
        torch.as_tensor(s, dtype=torch.int64).sort().values
        for s in parse_partition(partition)(data.labels, clients, seed)
    ]


def measured_client_bytes(ledger: Ledger, names: Sequence[str]) -> tuple[list[int], dict[str, int]]:
    """Bytes into or out of each named party (all kinds but ``control``), and their sum by kind
    (a link between two named parties counts for both, as in the analytic model)."""
    per = [0] * len(names)
    by_kind: dict[str, int] = {}
    index = {n: i for i, n in enumerate(names)}
    for link in ledger.links():
        if link.kind == "control":
            continue
        for party in {link.src, link.dst}:
            if party in index:
                per[index[party]] += link.nbytes
                by_kind[link.kind] = by_kind.get(link.kind, 0) + link.nbytes
    return per, by_kind


def run_method(
    method: str,
    clients: int,
    train: Dataset,
    test: Dataset,
    config: CompareConfig,
    segments: tuple[nn.Module, nn.Module],
    *,
    progress: bool = False,
) -> RunResult:
    """Train ``method`` with ``clients`` clients from copies of ``segments``; measure it."""
    if method not in METHODS:
        raise ConfigurationError(f"unknown method {method!r}; choose from {METHODS}")
    client_seg, server_seg = (copy.deepcopy(s) for s in segments)
    shards = make_shards(train, clients, config.partition, config.seed)
    sizes = [len(s) for s in shards]
    meter = ComputeMeter(count_flops=config.count_flops)
    workers = [meter.wrap(VirtualWorker(f"client{k}", fuse=False)) for k in range(clients)]
    names = [w.name for w in workers]
    start = time.perf_counter()
    if method == "split" or method in SPLITFED_METHODS:
        server = meter.wrap(VirtualWorker(SERVER, fuse=False))
        common = dict(partition=lambda labels, k, seed: shards, optimizer=config.optimizer)
        if method == "split":
            model = MultiHolderSplitNN(client_seg, [server_seg], workers, server, handoff="peer", **common)
        else:
            variant = method.removeprefix("splitfed-")
            model = SplitFedSplitNN(
                client_seg, [server_seg], workers, server, variant=variant, parallel=False, **common
            )
        model.fit(train, epochs=config.epochs, batch_size=config.batch_size, seed=config.seed, progress=progress)
        wall = time.perf_counter() - start
        ledger = model.ledger.snapshot()  # the training window; collecting the model below moves weights too
        trained = model.collect()
    else:
        whole = nn.Sequential(client_seg, server_seg)
        parts = [train.subset(s) for s in shards]
        if method == "fedavg":
            fed = FedAvg(whole, workers, optimizer=config.optimizer)
            fed.fit(
                parts,
                rounds=config.epochs // config.local_epochs,
                local_epochs=config.local_epochs,
                batch_size=config.batch_size,
                seed=config.seed,
                progress=progress,
            )
        else:
            fed = LargeBatchSGD(whole, workers, optimizer=config.optimizer)
            fed.fit(parts, epochs=config.epochs, batch_size=config.batch_size, seed=config.seed, progress=progress)
        wall = time.perf_counter() - start
        ledger, trained = fed.ledger.snapshot(), fed.model
    result = evaluate_module(trained, test)
    measured, by_kind = measured_client_bytes(ledger, names)
    comm = CommModel.from_segments(segments[0], segments[1], tuple(train.features.shape[1:]))
    predicted = client_bytes(
        method, comm, sizes, epochs=config.epochs, batch_size=config.batch_size, local_epochs=config.local_epochs
    )
    predicted_by_kind: dict[str, int] = {}
    for per in predicted:
        for kind, nbytes in per.items():
            if nbytes:
                predicted_by_kind[kind] = predicted_by_kind.get(kind, 0) + nbytes
    stats = meter.per_party()
    return RunResult(
        method=method,
        clients=clients,
        client_bytes=measured,
        predicted_client_bytes=[sum(p.values()) for p in predicted],
        client_flops=[stats[n].flops for n in names],
        client_seconds=[stats[n].seconds for n in names],
        accuracy=result.accuracy,
        test_loss=result.loss,
        wall_seconds=wall,
        train_samples=len(train),
        epochs=config.epochs,
        bytes_by_kind=by_kind,
        predicted_bytes_by_kind=predicted_by_kind,
        compute={n: s.to_dict() for n, s in stats.items()},
    )


def _warm_up(config: CompareConfig) -> None:
    """Pay one-time costs before the first timed run (the first optimizer built imports TorchDynamo, ~2 s)."""
    param = nn.Parameter(torch.zeros(2, 2))
    build_optimizer(config.optimizer, [param])
    with FlopCounterMode(display=False):
        (param @ param).sum().backward()


def run_comparison(
    config: CompareConfig,
    train: Dataset,
    test: Dataset,
    *,
    progress: bool = False,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Every method of ``config`` at every client count, from the same initial weights (seeded).

    Every run starts from the same initial weights and the same data shards
    (:func:`splitnn.data.parse_partition`, each shard sorted), trains for the same
    number of epochs over the training data, and is measured the same way:

    * **bytes per client**: what the ledger recorded on every link into or out of
      each client during training (all kinds but ``control``), checked against the
      analytic model (:mod:`splitnn.compare.analytic`);
    * **FLOPs and seconds per client**: PyTorch's FLOP counter and wall time around
      each worker call (:mod:`splitnn.accounting.flops`; workers run with
      ``fuse=False`` so each party's backward runs inside its own call);
    * **test accuracy** of the trained model, evaluated at the researcher after
      training (outside the measured window);
    * **wall time** of training.

    Split learning is :class:`~splitnn.training.topologies.MultiHolderSplitNN`:
    ``K`` clients ("client0", ...) hold the features of their shards and take
    round-robin turns (one per epoch) with the client segment, handing its weights
    peer to peer; a "server" worker holds the rest of the network and the labels
    (the vanilla configuration: the labels are placed at the server at set-up, not
    sent during training). SplitFed (``splitfed-v1``, ``splitfed-v2``) is
    :class:`~splitnn.training.topologies.SplitFedSplitNN` on the same parties, the server
    being the label holder and the aggregator, one round per local epoch; its holders run one
    after the other on one thread here (``parallel=False``), so that the FLOP counter and the
    per-client times see one call at a time: its wall time is not the parallel one (see
    docs/splitfed.md for that). FedAvg (``epochs / local_epochs`` rounds) and large-batch SGD
    keep the global model at the researcher.
    """
    if max(config.clients) > len(train):
        raise ConfigurationError(
            f"{max(config.clients)} clients but only {len(train)} training samples; use fewer clients or more data"
        )
    _warm_up(config)
    torch.manual_seed(config.seed)
    segments = build_model(config.model, tuple(train.features.shape[1:]), train.num_classes)
    runs = [(m, k) for k in config.clients for m in config.methods]
    results = []
    bar = tqdm(runs, desc="compare", unit="run", disable=not progress)
    for method, k in bar:
        bar.set_postfix_str(f"{method}, {k} client{'s' if k > 1 else ''}")
        result = run_method(method, k, train, test, config, segments, progress=progress)
        results.append(result)
        if on_result is not None:
            on_result(result)
    bar.close()
    return results
