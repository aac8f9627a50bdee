"""What every topology shares: the :class:`Topology` base class and the checks and placement of segments.

A topology is a :class:`~splitnn.split.trainable.Trainable` model that trains across several workers in a
particular arrangement (many data holders, U-shaped, vertically partitioned), so
:func:`~splitnn.training.fit` and :func:`~splitnn.training.evaluate` drive it; it talks to its parties
only through the :class:`~splitnn.workers.Worker` protocol.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from splitnn.errors import ConfigurationError, ShapeMismatchError
from splitnn.split import Stage
from splitnn.split.trainable import Trainable
from splitnn.workers import LossStats, Worker
from splitnn.workers.metrics import label_holder_metrics
from splitnn.workers.refs import fresh_name


def new_prefix(kind: str) -> str:
    """A random key prefix, so several models (and researchers) can share workers without colliding."""
    return fresh_name(kind)


def as_worker_list(workers: Worker | Sequence[Worker], count: int, what: str) -> list[Worker]:
    """``count`` workers: one worker repeated, or a sequence of exactly ``count``."""
    if isinstance(workers, Worker):
        return [workers] * count
    workers = list(workers)
    if len(workers) != count:
        raise ConfigurationError(
            f"got {count} {what} but {len(workers)} workers for them; give one worker per "
            f"segment (or a single worker for all of them)"
        )
    return workers


def as_optimizer_list(optimizer: object, count: int) -> list[object]:
    """One optimizer (factory or spec) per segment: a single one repeated, or a list of ``count``."""
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer] * count
    if len(optimizers) != count:
        raise ConfigurationError(f"got {len(optimizers)} optimizers for {count} segments; give one, or one per segment")
    return optimizers


def check_modules(segments: Sequence[nn.Module], what: str) -> list[nn.Module]:
    """Refuse anything that is not an ``nn.Module``."""
    segments = list(segments)
    for i, seg in enumerate(segments):
        if not isinstance(seg, nn.Module):
            raise ConfigurationError(f"{what} {i} is a {type(seg).__name__}, not an nn.Module")
    return segments


def place(
    prefix: str,
    first_index: int,
    segments: Sequence[nn.Module],
    workers: Sequence[Worker],
    optimizers: Sequence[object],
) -> list[Stage]:
    """Host each segment at its worker under ``{prefix}.s{index}``; return the stages."""
    stages = []
    for offset, (seg, worker, opt) in enumerate(zip(segments, workers, optimizers)):
        stage = Stage(first_index + offset, f"{prefix}.s{first_index + offset}", worker)
        worker.add_segment(stage.key, seg, opt)
        stages.append(stage)
    return stages


def probe_stages(stages: Sequence[Stage], shape: tuple[int, ...], came_from: str) -> tuple[int, ...]:
    """Run zeros of ``shape`` through ``stages`` (in order); name both sides of a cut that does not fit.

    ``came_from`` says where an input of ``shape`` comes from, for the message
    about the first stage.
    """
    before = came_from
    for stage in stages:
        try:
            shape = stage.worker.probe(stage.key, shape)
        except RuntimeError as exc:
            raise ShapeMismatchError(
                f"{before} gives shape {tuple(shape)} but {stage.label} cannot take it: {exc}"
            ) from exc
        before = stage.label
    return shape


def combine_stats(parts: Sequence[LossStats]) -> LossStats:
    """One batch's stats from the stats of its pieces (mean loss weighted by count)."""
    count = sum(p.count for p in parts)
    loss = sum(p.loss * p.count for p in parts) / count
    correct = -1 if any(p.correct < 0 for p in parts) else sum(p.correct for p in parts)
    return LossStats(float(loss), correct, count)


def check_bottom_and_top(
    bottom: nn.Module, top: Sequence[nn.Module], holders: Sequence[Worker], top_workers: Worker | Sequence[Worker]
) -> tuple[nn.Module, list[nn.Module], list[Worker], list[Worker]]:
    """The checks of many data holders sharing one bottom segment (each a copy) before the top segments:
    modules, at least one holder and one top segment, distinct holders, none of them a top worker."""
    bottom = check_modules([bottom], "bottom segment")[0]
    top = check_modules(top, "top segment")
    if not top:
        raise ConfigurationError("the label holder needs at least one top segment after the bottom segment")
    holders = list(holders)
    if not holders:
        raise ConfigurationError("give at least one data holder")
    distinct(holders, "data holders")
    top_workers = as_worker_list(top_workers, len(top), "top segments")
    refuse_shared(holders, top_workers, "a data holder hosts only its copy of the bottom segment")
    return bottom, top, holders, top_workers


def refuse_shared(holders: Sequence[Worker], top_workers: Sequence[Worker], why: str) -> None:
    """Refuse a party that is both a data holder and a top worker, saying ``why``."""
    shared = sorted({h.name for h in holders} & {w.name for w in top_workers})
    if shared:
        raise ConfigurationError(f"{shared} cannot be both a data holder and a top worker; {why}")


def distinct(workers: Sequence[Worker], what: str) -> None:
    """Refuse the same party twice in a role that needs distinct parties."""
    names = [w.name for w in workers]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigurationError(f"{what} must be distinct parties, but {dup} appear more than once")


class Topology(Trainable):
    """Base class of the topologies: a :class:`~splitnn.split.trainable.Trainable` whose parties are listed by
    :meth:`workers` and whose metrics the ``label_holder`` computes.

    Subclasses set ``ledger`` and ``label_holder`` and implement ``prepare``, ``train_batch``,
    ``eval_batch``, ``parties`` and ``workers``.
    """

    label_holder: Worker  # where the loss and the metrics are computed

    def workers(self) -> list[Worker]:
        """Every distinct worker of the model (subclasses list theirs)."""
        return []

    def party_workers(self) -> list[Worker]:
        """Every distinct worker of the model: :meth:`workers`."""
        return self.workers()

    def metrics(self, keep: str, names: Sequence[str]) -> dict[str, float]:
        """Metrics over the outputs the label holder kept during ``eval_batch(..., keep=keep)`` calls."""
        return label_holder_metrics(self.label_holder, keep, names)
