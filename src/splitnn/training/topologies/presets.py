"""Ready-made topologies of the tutorial's MLP, named parties included (what ``splitnn train`` builds).

Parties: data holders ``alice`` (one) or ``alice1`` ... ``aliceK`` (several);
``bob`` hosts everything that is not a data holder's, holds the labels (except
in U-shaped training, where ``alice`` keeps them), is the weight store of
``central`` hand-offs and SplitFed's aggregator unless another party is named.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from splitnn.data import column_partition, parse_partition
from splitnn.errors import ConfigurationError
from splitnn.models import tutorial_mlp
from splitnn.split.fit import check_positive
from splitnn.training.topologies.base import Topology
from splitnn.training.topologies.multi import HANDOFF_MODES, MultiHolderSplitNN
from splitnn.training.topologies.splitfed import VARIANTS, SplitFedSplitNN
from splitnn.training.topologies.ushape import UShapedSplitNN
from splitnn.training.topologies.vertical import VerticalSplitNN
from splitnn.workers import VirtualWorker, Worker
from splitnn.workers.merge import MERGE_MODES

#: The topologies ``splitnn train --topology`` offers (``chain`` is a plain SplitNN).
TOPOLOGIES = ("chain", "multi", "splitfed", "u-shape", "vertical")


#: The most data holders a topology is built with (each is a party: a worker, its segments, its shard).
MAX_CLIENTS = 1024


@dataclass(frozen=True)
class TopologyConfig:
    """How to arrange the tutorial's MLP across parties.

    Attributes:
        topology: ``"multi"``, ``"splitfed"``, ``"u-shape"`` or ``"vertical"`` (``"chain"`` is
            built by :class:`~splitnn.split.SplitNN` directly).
        clients: number of data holders (multi, splitfed: >= 1, vertical: >= 2, u-shape: 1).
        handoff: ``"peer"`` or ``"central"`` (multi only).
        partition: ``"iid"`` or ``"dirichlet:<alpha>"`` (multi and splitfed).
        turn_batches: batches per turn, ``None`` for one turn per epoch (multi only).
        variant: ``"v1"`` or ``"v2"`` (splitfed only).
        round_batches: batches of each holder per round, ``None`` for one round per epoch (splitfed only).
        aggregator: the party that averages the bottom segments, ``"bob"`` (the label holder)
            or the name of a third party (splitfed only).
        merge: ``"concat"``, ``"sum"`` or ``"mean"`` (vertical only).
        hidden: hidden layer sizes; one segment per layer as in the tutorial.
        lr: SGD learning rate of every segment.
        seed: seed of the partitioner.
    """

    topology: str
    clients: int = 1
    handoff: str = "peer"
    partition: str = "iid"
    turn_batches: int | None = None
    variant: str = "v1"
    round_batches: int | None = None
    aggregator: str = "bob"
    merge: str = "concat"
    hidden: tuple[int, ...] = (128, 640)
    lr: float = 0.03
    seed: int = 0

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ConfigurationError(f"unknown topology {self.topology!r}; choose one of {TOPOLOGIES}")
        check_positive("the number of clients", self.clients)
        if self.clients > MAX_CLIENTS:
            raise ConfigurationError(
                f"{self.clients} clients (data holders) is more than the {MAX_CLIENTS} a topology is built with "
                f"(each is a party with its own segments and shard); use at most --clients {MAX_CLIENTS}"
            )
        if self.topology == "vertical" and self.clients < 2:
            raise ConfigurationError("vertical training needs at least 2 clients (data holders); use --clients 2")
        if self.topology in ("chain", "u-shape") and self.clients != 1:
            raise ConfigurationError(
                f"--topology {self.topology} has exactly one data holder; --clients applies to multi and vertical"
            )
        if self.handoff not in HANDOFF_MODES:
            raise ConfigurationError(f"unknown handoff {self.handoff!r}; choose one of {HANDOFF_MODES}")
        parse_partition(self.partition)
        check_positive("turn_batches", self.turn_batches, none_means="one turn per epoch")
        if self.variant not in VARIANTS:
            raise ConfigurationError(f"unknown SplitFed variant {self.variant!r}; choose one of {VARIANTS}")
        check_positive("round_batches", self.round_batches, none_means="one round per epoch")
        if not isinstance(self.aggregator, str) or not self.aggregator or self.aggregator == "researcher":
            raise ConfigurationError(f"the aggregator must be a party's name, got {self.aggregator!r}")
        if self.aggregator in self.holder_names():
            raise ConfigurationError(
                f"the aggregator {self.aggregator!r} is a data holder; it would see every other holder's "
                f"bottom weights: use bob (the label holder) or a third party's name"
            )
        if self.merge not in MERGE_MODES:
            raise ConfigurationError(f"unknown merge {self.merge!r}; choose one of {MERGE_MODES}")
        if not self.hidden or any(not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ConfigurationError(f"hidden sizes must be positive integers, got {self.hidden!r}")
        minimum = 1 if self.topology != "u-shape" else 2
        if len(self.hidden) < minimum:
            raise ConfigurationError(
                f"--topology {self.topology} needs at least {minimum + 1} segments, i.e. {minimum} hidden sizes"
            )

    def holder_names(self) -> list[str]:
        """The data holders' names."""
        return ["alice"] if self.clients == 1 else [f"alice{i + 1}" for i in range(self.clients)]

    def party_names(self) -> list[str]:
        """Every party's name: the data holders, ``bob``, then SplitFed's aggregator if it is a third party."""
        third = [self.aggregator] if self.topology == "splitfed" and self.aggregator != "bob" else []
        return [*self.holder_names(), "bob", *third]


def vertical_mlp(
    part_sizes: Sequence[int], hidden: Sequence[int], classes: int, merge: str
) -> tuple[list[nn.Module], list[nn.Module]]:
    """Bottoms ``Flatten, Linear(part, hidden[0]), ReLU`` per holder; top: the tutorial's remaining layers."""
    bottoms: list[nn.Module] = [nn.Sequential(nn.Flatten(), nn.Linear(p, hidden[0]), nn.ReLU()) for p in part_sizes]
    width = hidden[0] * len(part_sizes) if merge == "concat" else hidden[0]
    top = tutorial_mlp(tuple(hidden[1:]), in_features=width, classes=classes, flatten=False)
    return bottoms, top


def build_topology(
    config: TopologyConfig, feature_shape: Sequence[int], classes: int, *, workers: Mapping[str, Worker] | None = None
) -> Topology:
    """Build ``config``'s topology of the tutorial's MLP.

    ``workers`` gives the parties by name (e.g. networked workers from
    :func:`splitnn.connect`, keyed by their names); it must hold exactly
    :meth:`TopologyConfig.party_names`. Default: fresh :class:`~splitnn.VirtualWorker` s.
    Weights come from torch's global generator: seed it first for reproducible runs.
    """
    in_features = math.prod(feature_shape)
    optimizer = f"sgd:lr={config.lr}"
    parties = _parties(config, workers)
    holders = [parties[n] for n in config.holder_names()]
    bob = parties["bob"]
    if config.topology in ("multi", "splitfed", "u-shape"):
        segments = tutorial_mlp(config.hidden, in_features=in_features, classes=classes)
    if config.topology in ("multi", "splitfed"):  # the bottom at every holder, the top at bob
        chain = (segments[0], segments[1:], holders, bob)
        shards = dict(partition=config.partition, partition_seed=config.seed, optimizer=optimizer)
        if config.topology == "multi":
            return MultiHolderSplitNN(*chain, handoff=config.handoff, turn_batches=config.turn_batches, **shards)
        aggregator = parties[config.aggregator]
        return SplitFedSplitNN(
            *chain, variant=config.variant, aggregator=aggregator, round_batches=config.round_batches, **shards
        )
    if config.topology == "u-shape":
        return UShapedSplitNN(segments[0], segments[1:-1], segments[-1], holders[0], bob, optimizer=optimizer)
    if config.topology == "vertical":
        shape = tuple(feature_shape)
        how = "halves" if len(shape) in (2, 3) else "contiguous"
        columns = column_partition(shape if how == "halves" else in_features, config.clients, how)
        bottoms, top = vertical_mlp([len(c) for c in columns], config.hidden, classes, config.merge)
        return VerticalSplitNN(bottoms, holders, top, bob, merge=config.merge, columns=columns, optimizer=optimizer)
    raise ConfigurationError(
        f"build_topology makes multi, splitfed, u-shape and vertical; build {config.topology!r} with SplitNN"
    )


def _parties(config: TopologyConfig, workers: Mapping[str, Worker] | None) -> dict[str, Worker]:
    names = config.party_names()
    if workers is None:
        return {n: VirtualWorker(n) for n in names}
    missing = [n for n in names if n not in workers]
    extra = sorted(set(workers) - set(names))
    if missing or extra:
        raise ConfigurationError(
            f"--topology {config.topology} with {config.clients} data holder(s) needs exactly the "
            f"parties {names}; got {sorted(workers)} (missing {missing}, not used {extra}); "
            f"start `splitnn worker --name NAME` for each party"
        )
    return {n: workers[n] for n in names}
