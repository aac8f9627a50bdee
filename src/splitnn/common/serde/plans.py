"""Losses and shipped epochs: a batch's loss stats, a worker's part of an epoch (its plan), the progress replies
and the final report."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitnn.common.serde.blocks import MAX_PLAN_STAGES
from splitnn.errors import ConfigurationError, WireError
from splitnn.wire.tensor_codec import decode_tensor, encode_tensor
from splitnn.workers.epoch import RUN_ID_BITS, BatchOrder, EpochPlan, EpochReport, StagePlan
from splitnn.workers.refs import LossStats


# ------------------------------------------------------------------------------- shipped epochs
def epoch_plan_to_command(plan: EpochPlan) -> tuple[dict, list[bytes]]:
    """A worker's part of a training epoch (the ``run_epoch`` command): explicit batches travel as two
    blobs, every index and each batch's size."""
    args = {
        "run": plan.run_id,
        "dataset": plan.dataset,
        "loss": plan.loss,
        "stages": [{"index": s.index, "key": s.key, "prev": s.prev, "next": s.next} for s in plan.stages],
        "progress_interval": plan.progress_interval,
        "order": plan.order.to_dict() if plan.order is not None else None,
        "chain": list(plan.chain) if plan.chain is not None else None,
        "pipeline": plan.pipeline,
        "prediction": plan.prediction,
    }
    blobs: list[bytes] = []
    if plan.indices is not None:
        flat = torch.cat([i.to(torch.int64).reshape(-1) for i in plan.indices])
        sizes = torch.tensor([i.numel() for i in plan.indices], dtype=torch.int64)
        blobs = [encode_tensor(flat), encode_tensor(sizes)]
    return args, blobs


def epoch_plan_from_command(args: dict, blobs: Sequence[bytes], *, worker: str, max_bytes: int) -> EpochPlan:
    """The plan of worker ``worker``, checked for consistency (stages in order, consecutive where they
    feed each other at ``worker``); whether the worker hosts its segments and data is the server's to check."""
    run_id = args.get("run")
    if not isinstance(run_id, int) or isinstance(run_id, bool) or not 0 < run_id < 1 << RUN_ID_BITS:
        raise WireError("epoch plan: 'run' must be a small positive integer")
    dataset, loss = args.get("dataset"), args.get("loss")
    if not isinstance(dataset, str) or not 0 < len(dataset) <= 256:
        raise WireError("epoch plan: 'dataset' must be a dataset name")
    if not isinstance(loss, str):
        raise WireError("epoch plan: 'loss' must be a loss name")
    interval = args.get("progress_interval", 0.05)
    if not isinstance(interval, (int, float)) or isinstance(interval, bool) or not 0 <= interval <= 3600:
        raise WireError("epoch plan: 'progress_interval' must be 0..3600 seconds")
    stages = _stages_from_args(args.get("stages"), worker)
    order = indices = None
    if args.get("order") is not None:
        order = BatchOrder.from_dict(args["order"])
    else:
        indices = _explicit_batches(blobs, max_bytes)
    # the chain of parties (the schedule is built from it; null: a lock-step plan) and the batches in flight
    chain, pipeline = args.get("chain"), args.get("pipeline")
    if chain is not None and (
        not isinstance(chain, list)
        or not 0 < len(chain) <= MAX_PLAN_STAGES
        or not all(isinstance(p, str) for p in chain)
    ):
        raise WireError("epoch plan: 'chain' must be a list of party names, one per stage")
    if not isinstance(pipeline, int) or isinstance(pipeline, bool):
        raise WireError("epoch plan: 'pipeline' must be an integer")
    prediction = args.get("prediction")
    if prediction is not None and (isinstance(prediction, bool) or not isinstance(prediction, (int, float))):
        raise WireError("epoch plan: 'prediction' must be a number or null")
    try:
        plan = EpochPlan(
            run_id,
            dataset,
            loss,
            stages,
            order=order,
            indices=indices,
            progress_interval=float(interval),
            chain=tuple(chain) if chain is not None else None,
            pipeline=pipeline,
            prediction=float(prediction) if prediction is not None else None,
        )
    except ConfigurationError as exc:
        raise WireError(f"epoch plan: {exc}") from None
    if plan.chain is not None and {i for i, p in enumerate(plan.chain) if p == worker} != {st.index for st in stages}:
        raise WireError(f"epoch plan: the chain gives {worker!r} other stages than the plan's")
    return plan


def _party(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise WireError(f"epoch plan: {what} must be a party name or null")
    return value


def _stages_from_args(raw_stages: object, me: str) -> tuple[StagePlan, ...]:
    """The plan's stages, consecutive where they feed each other at worker ``me``."""
    if not isinstance(raw_stages, list) or not 0 < len(raw_stages) <= MAX_PLAN_STAGES:
        raise WireError("epoch plan: 'stages' must be a non-empty list")
    stages: list[StagePlan] = []
    for s in raw_stages:
        if not isinstance(s, dict) or set(s) != {"index", "key", "prev", "next"}:
            raise WireError("epoch plan: each stage must be an object {index, key, prev, next}")
        index, key = s["index"], s["key"]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 255:
            raise WireError("epoch plan: a stage index must be 0..254")
        if not isinstance(key, str) or not key:
            raise WireError("epoch plan: a stage key must be a string")
        st = StagePlan(index, key, _party(s["prev"], "prev"), _party(s["next"], "next"))
        if (st.prev is None) != (index == 0):
            raise WireError("epoch plan: exactly the first stage (index 0) has no previous party")
        if stages and index <= stages[-1].index:
            raise WireError("epoch plan: stage indices must increase")
        if st.prev == me and not (stages and stages[-1].index == index - 1 and stages[-1].next == me):
            raise WireError(f"epoch plan: stage {index} is fed by this worker but stage {index - 1} is not here")
        if stages and stages[-1].next == me and not (stages[-1].index == index - 1 and st.prev == me):
            raise WireError(
                f"epoch plan: stage {stages[-1].index} feeds this worker but stage "
                f"{stages[-1].index + 1} is not next here"
            )
        if stages and stages[-1].next is None:
            raise WireError("epoch plan: the last segment must be the last stage of the plan")
        stages.append(st)
    if stages[-1].next == me:
        raise WireError(f"epoch plan: stage {stages[-1].index} feeds this worker but the next stage is missing")
    return tuple(stages)


def _explicit_batches(blobs: Sequence[bytes], max_bytes: int) -> tuple[torch.Tensor, ...]:
    if len(blobs) != 2:
        raise WireError("epoch plan: give either 'order' or two blobs (all indices, batch sizes)")
    flat, sizes = (decode_tensor(b, max_bytes=max_bytes, allowed_dtypes=(torch.int64,), max_ndim=1) for b in blobs)
    if flat.dim() != 1 or sizes.dim() != 1 or not sizes.numel():
        raise WireError("epoch plan: indices and batch sizes must be non-empty 1-D int64 tensors")
    if int(sizes.min()) < 1 or int(sizes.sum()) != flat.numel():
        raise WireError("epoch plan: batch sizes must be positive and add up to the number of indices")
    return tuple(torch.split(flat, sizes.tolist()))


def losses_to_result(losses: Sequence[LossStats]) -> dict:
    """The label holder's per-batch losses of a shipped epoch (a progress reply; Python floats
    round-trip exactly through JSON)."""
    return {"loss": [s.loss for s in losses], "count": [s.count for s in losses]}


def losses_from_result(d: dict) -> list[LossStats]:
    loss, count = d.get("loss", []), d.get("count", [])
    if not (isinstance(loss, list) and isinstance(count, list) and len(loss) == len(count)):
        raise WireError("malformed progress report")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in loss) or not all(
        isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in count
    ):
        raise WireError("malformed loss in a progress report")
    return [LossStats(float(x), -1, int(c)) for x, c in zip(loss, count)]


def epoch_report_to_result(batches: int) -> dict:
    """A worker's final reply to ``run_epoch``: how many batches it ran."""
    return {"batches": batches}


def epoch_report_from_result(result: dict, worker: str) -> EpochReport:
    batches = result.get("batches", 0)
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 0:
        raise WireError("run_epoch: the final reply must count the batches run")
    return EpochReport(worker, batches)


def loss_stats_to_result(stats: LossStats) -> dict:
    """One batch's loss, correct count and size (the ``loss`` reply)."""
    return {"loss": stats.loss, "correct": stats.correct, "count": stats.count}


def loss_stats_from_result(result: dict) -> LossStats:
    try:
        return LossStats(float(result["loss"]), int(result["correct"]), int(result["count"]))
    except (KeyError, TypeError, ValueError, OverflowError):  # int(inf) overflows
        raise WireError("loss: the reply must hold 'loss', 'correct' and 'count'") from None
