"""Aligning vertically partitioned parties with private set intersection (PSI), before training.

Each party holds its own sample ids (``worker.add_dataset(name, ..., ids=[...])``, or a table with an
id column). :func:`intersect` makes every party keep exactly the samples all of them hold, in one order,
so that row ``i`` is the same sample everywhere; its docstring says how, what each party learns and
what each accepts. The parties may be in-process workers or ``splitnn worker`` processes.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from splitnn.errors import ConfigurationError, WorkerError
from splitnn.split import bind_workers
from splitnn.workers import PsiWorker, Worker

__all__ = ["PsiResult", "intersect"]


@dataclass(frozen=True)
class PsiResult:
    """What the researcher learns: the intersection's size, and the size of each named part."""

    dataset: str
    size: int
    parts: dict[str, int] = field(default_factory=dict)


def intersect(
    dataset: str,
    holders: Sequence[Worker],
    label_holder: Worker,
    *,
    split: Mapping[str, float] | None = None,
    seed: int = 0,
) -> PsiResult:
    """Make ``holders`` and ``label_holder`` keep exactly their common samples of ``dataset``, in one order.

    ``split`` (e.g. ``{"train": 0.8, "test": 0.2}``) also cuts the aligned rows into datasets named
    ``f"{dataset}:{part}"`` at every party, by a random permutation drawn from ``seed`` (fractions
    may sum to less than 1; the rest is in no part). The datasets are replaced only once every
    party has its intersection; on any error nothing is changed.

    It runs in three steps:

    1. the label holder intersects its ids with each feature holder's in turn, as the PSI client
       (:mod:`splitnn.data.psi_messages`; ECDH, ``openmined-psi``): its candidate rows shrink to the ids
       every holder has -- the intersection;
    2. each feature holder then intersects its ids with the label holder's intersection, as the
       client: it learns exactly the intersection;
    3. every party keeps its intersected rows in ascending id order (optionally cut into named
       parts, e.g. a train and a test set, at positions the researcher draws knowing only the size).

    Every message is bytes between two parties, recorded in the ledger with kind ``psi`` on their
    own link; the researcher only relays handles and learns the intersection's size. The parties
    may be in-process (:class:`~splitnn.workers.VirtualWorker`) or ``splitnn worker`` processes
    (:func:`splitnn.connect`), where the receiving worker pulls each message from its sender over
    their peer stream; the rounds and the bytes are the same.

    What each party learns. A feature holder: the intersection (among its own ids), and the size
    of the label holder's current candidate set when it answers step 1. The label holder: which of
    its own ids each feature holder holds -- with several feature holders, step 1's intermediate
    intersections include ids that a later holder lacks (two-party PSI cannot hide that; with one
    feature holder it learns exactly the intersection). No party sees an id it does not hold.

    What each party accepts (its policy, :func:`splitnn.workers.policy.check_psi`): a run over a
    dataset its operator placed (a networked party: loaded with ``--data``; never one a researcher
    placed, so guessed ids cannot probe another party, nor rows an earlier intersection derived),
    with the parties of ``psi_peers`` only, and at most ``max_psi_runs`` runs per dataset.

    Raises:
        ConfigurationError: a party without PSI, parties named twice, a bad split, or no common
            sample (the datasets stay as they were).
        WorkerError: a party holds no ids for ``dataset``, or the parties disagree on the size.
    """
    parties = [*holders, label_holder]
    if not holders:
        raise ConfigurationError("private set intersection needs at least one feature holder besides the label holder")
    names = [p.name for p in parties]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"PSI parties must be distinct, got {names}")
    lacking = [p.name for p in parties if not isinstance(p, PsiWorker)]
    if lacking:
        raise ConfigurationError(
            f"worker(s) {lacking} cannot run private set intersection (they lack the PsiWorker methods "
            f"psi_request, psi_reply, ...); use splitnn.VirtualWorker or splitnn.connect workers"
        )
    fractions = _check_split(split)
    bind_workers(parties, None)  # the parties reach each other by name; PSI bytes go to their shared ledger
    run = secrets.token_hex(6)
    try:
        # 1. the label holder narrows its rows to the ids every feature holder has
        for i, holder in enumerate(holders):
            _one_intersection(f"psi-{run}-l{i}", dataset, client=label_holder, server=holder)
        # 2. each feature holder learns the intersection among its own ids
        for i, holder in enumerate(holders):
            _one_intersection(f"psi-{run}-h{i}", dataset, client=holder, server=label_holder)
        sizes = {p.name: p.psi_size(dataset) for p in parties}
        if len(set(sizes.values())) != 1:
            raise WorkerError(f"PSI of dataset {dataset!r}: the parties ended with different sizes {sizes}")
        size = sizes[label_holder.name]
        if size == 0:
            raise ConfigurationError(
                f"PSI of dataset {dataset!r}: the parties {names} have no common samples; check that they use "
                f"the same kind of ids (same format, e.g. 'P0007' vs '7')"
            )
        parts = _positions(fractions, size, seed, dataset)
    except BaseException:
        for p in parties:
            try:
                p.psi_cancel(dataset)
            except Exception:  # (an unreachable party) the first error is the one to report; cancel the others
                pass
        raise
    for p in parties:
        p.psi_apply(dataset, parts)
    return PsiResult(dataset, size, {name: len(idx) for name, idx in parts.items()})


def _one_intersection(session: str, dataset: str, *, client: Worker, server: Worker) -> None:
    """One two-party PSI: the request travels client -> server, the reply server -> client (peer to peer)."""
    request = client.psi_request(session, dataset)
    reply = server.psi_reply(dataset, request)
    client.psi_finish(session, reply)


def _check_split(split: Mapping[str, float] | None) -> dict[str, float]:
    if split is None:
        return {}
    fractions = dict(split)
    for name, f in fractions.items():
        if not isinstance(name, str) or not name or ":" in name:
            raise ConfigurationError(f"split part names must be non-empty strings without ':', got {name!r}")
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (math.isfinite(f) and 0 < f <= 1):
            raise ConfigurationError(f"split fraction of {name!r} must be in (0, 1], got {f!r}")
    if sum(fractions.values()) > 1 + 1e-9:
        raise ConfigurationError(f"split fractions {fractions} add up to more than 1")
    return fractions


def _positions(fractions: dict[str, float], size: int, seed: int, dataset: str) -> dict[str, torch.Tensor]:
    """Each part's positions in the aligned order: consecutive runs of one seeded permutation, each sorted."""
    if not fractions:
        return {}
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(int(seed)))
    parts, total, start = {}, 0.0, 0
    for name, f in fractions.items():
        total += f
        end = min(size, round(total * size))  # cumulative bounds: the parts tile the permutation
        if end <= start:
            raise ConfigurationError(
                f"PSI of dataset {dataset!r}: part {name!r} ({f:g} of {size} common samples) would be empty; "
                f"use a larger fraction"
            )
        parts[f"{dataset}:{name}"] = perm[start:end].sort().values
        start = end
    return parts
