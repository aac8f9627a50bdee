"""The ``--topology`` flags of ``splitnn train``: many data holders (turns or SplitFed), U-shaped, vertical.

``chain`` (the default) is the plain split network of ``--workers``; the other
topologies name their parties themselves (see
:mod:`splitnn.training.topologies.presets`).
"""

from __future__ import annotations

import argparse

from splitnn.errors import ConfigurationError

#: ``--workers``' default in ``splitnn train`` (the other topologies refuse any other value).
DEFAULT_WORKERS = "alice,bob,claire"
TOPOLOGY_CHOICES = ("chain", "multi", "splitfed", "u-shape", "vertical")


def add_topology_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``--topology`` and the flags of the topologies (``--clients``, ``--handoff``, ``--partition``,
    ``--turn-batches``, ``--variant``, ``--round-batches``, ``--aggregator``, ``--merge``)."""
    g = p.add_argument_group("topology", "how the network and the data are spread over the parties")
    g.add_argument(
        "--topology",
        choices=TOPOLOGY_CHOICES,
        default="chain",
        help="chain: one data holder, segments on --workers (default); multi: --clients data holders "
        "alice1..aliceK take round-robin turns with the first segment, bob holds the rest and the "
        "labels; splitfed: --clients data holders alice1..aliceK train in parallel, each with its own copy "
        "of the first segment, averaged every round (SplitFed, Thapa et al.); "
        "u-shape: alice holds the first and last segments and the labels, bob the middle; "
        "vertical: --clients data holders own vertical strips of each image, bob merges their "
        "activations and holds the labels",
    )
    g.add_argument(
        "--clients",
        type=int,
        default=None,
        metavar="K",
        help="number of data holders (multi, splitfed: default 3; vertical: default 2)",
    )
    g.add_argument(
        "--handoff",
        choices=("peer", "central"),
        default=None,
        help="multi: pass the first segment's weights holder to holder (peer, default) or through a "
        "weight store at bob (central)",
    )
    g.add_argument(
        "--partition",
        default=None,
        metavar="SCHEME",
        help="multi, splitfed: how samples are shared out: iid (default) or dirichlet:ALPHA (label skew, "
        "e.g. dirichlet:0.5)",
    )
    g.add_argument(
        "--turn-batches",
        type=int,
        default=None,
        metavar="N",
        help="multi: batches per turn before the next holder takes over (default: a holder's whole "
        "shard, one turn per epoch)",
    )
    g.add_argument(
        "--variant",
        choices=("v1", "v2"),
        default=None,
        help="splitfed: v1 (bob keeps one copy of the top segments per holder, averaged every round; default) "
        "or v2 (one top, serving the holders one batch at a time in a seeded random order per round)",
    )
    g.add_argument(
        "--round-batches",
        type=int,
        default=None,
        metavar="N",
        help="splitfed: batches of each holder per round, after which the copies are averaged (default: a "
        "holder's whole shard, one round per epoch)",
    )
    g.add_argument(
        "--aggregator",
        default=None,
        metavar="NAME",
        help="splitfed: the party that averages the holders' first segments: bob (the label holder, default; it "
        "then sees their weights too) or another name, a third party that sees only weights",
    )
    g.add_argument(
        "--merge",
        choices=("concat", "sum", "mean"),
        default=None,
        help="vertical: how bob merges the holders' activations (default: concat)",
    )


def topology_from_args(args: argparse.Namespace, hidden: list[int]):
    """The :class:`~splitnn.training.topologies.TopologyConfig` the flags ask for, or ``None`` for ``chain``.

    Raises:
        ConfigurationError: a flag that does not apply to the chosen topology, or an invalid value.
    """
    topology = getattr(args, "topology", "chain")
    given = {
        flag: getattr(args, dest)
        for flag, dest in (
            ("--clients", "clients"),
            ("--handoff", "handoff"),
            ("--partition", "partition"),
            ("--turn-batches", "turn_batches"),
            ("--variant", "variant"),
            ("--round-batches", "round_batches"),
            ("--aggregator", "aggregator"),
            ("--merge", "merge"),
        )
    }
    applies = {
        "chain": set(),
        "u-shape": set(),
        "multi": {"--clients", "--handoff", "--partition", "--turn-batches"},
        "splitfed": {"--clients", "--partition", "--variant", "--round-batches", "--aggregator"},
        "vertical": {"--clients", "--merge"},
    }[topology]
    stray = [flag for flag, value in given.items() if value is not None and flag not in applies]
    if stray:
        raise ConfigurationError(f"{', '.join(stray)} do(es) not apply to --topology {topology}")
    if topology == "chain":
        return None
    urls = [w.strip() for w in args.workers.split(",") if w.strip()]
    if args.workers != DEFAULT_WORKERS and not all(u.startswith("grpc://") for u in urls):
        raise ConfigurationError(
            f"--workers applies to --topology chain; --topology {topology} names its parties "
            f"itself (alice.., bob), so --workers may only give their grpc:// addresses"
        )
    if args.save is not None and topology == "vertical":
        raise ConfigurationError(
            "--save does not support --topology vertical (its merge is not a saveable layer); "
            "use VerticalSplitNN.collect() from Python"
        )
    from splitnn.training.topologies import TopologyConfig

    clients = (
        given["--clients"]
        if given["--clients"] is not None
        else {"multi": 3, "splitfed": 3, "vertical": 2}.get(topology, 1)
    )
    return TopologyConfig(
        topology,
        clients=clients,
        handoff=args.handoff or "peer",
        partition=args.partition or "iid",
        turn_batches=args.turn_batches,
        variant=args.variant or "v1",
        round_batches=args.round_batches,
        aggregator=args.aggregator or "bob",
        merge=args.merge or "concat",
        hidden=tuple(hidden),
        lr=args.lr,
        seed=args.seed,
    )


def describe(config) -> str:
    """One line saying who holds what, for the report's header."""
    holders = config.holder_names()
    who = holders[0] if len(holders) == 1 else f"{holders[0]}..{holders[-1]}"
    if config.topology == "multi":
        turn = f"{config.turn_batches} batches" if config.turn_batches else "one shard"
        return (
            f"multi: {len(holders)} data holders {who} ({config.partition} shards, {config.handoff} hand-offs, "
            f"turns of {turn}) -> bob (labels)"
        )
    if config.topology == "splitfed":
        rounds = f"rounds of {config.round_batches} batches" if config.round_batches else "one round per epoch"
        aggregator = "bob" if config.aggregator == "bob" else f"{config.aggregator} (third party)"
        return (
            f"splitfed {config.variant}: {len(holders)} data holders {who} in parallel ({config.partition} shards, "
            f"{rounds}, averaged by {aggregator}) -> bob (labels)"
        )
    if config.topology == "u-shape":
        return "u-shape: alice (first and last segments, labels) <-> bob (middle)"
    return f"vertical: {len(holders)} data holders {who} (image strips) -{config.merge}-> bob (labels)"
