"""fit / evaluate loops over any model that trains batch by batch across workers."""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from splitnn.checks import check_positive
from splitnn.data.batching import check_seed, epoch_batches
from splitnn.errors import ConfigurationError, WorkerUnreachableError
from splitnn.split.manifest import CheckpointJob, Position, check_every, data_summary, ledger_from_rows, ledger_rows
from splitnn.split.progress import EpochProgress, progress_mode
from splitnn.split.trainable import Trainable
from splitnn.workers import LossStats, ReconnectingWorker
from splitnn.workers.metrics import check_metric_names
from splitnn.workers.schedules import check_pipeline_depth


@dataclass
class EvalResult:
    """Mean loss and metrics on a dataset, with the bytes each party sent meanwhile.

    ``metrics`` holds every metric asked for, by name (``{"accuracy": ..., "auc": ...}``);
    ``accuracy`` is ``metrics["accuracy"]`` (NaN when it was not computed).
    """

    accuracy: float
    loss: float
    count: int
    bytes_sent: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        sent = ", ".join(f"{k} {v:,} B" for k, v in self.bytes_sent.items())
        shown = self.metrics or ({"accuracy": self.accuracy} if not math.isnan(self.accuracy) else {})
        values = "".join(f"{k} {v:.4f}, " for k, v in shown.items())
        return f"{values}loss {self.loss:.4f} on {self.count} samples; sent: {sent}"


@dataclass
class EpochStats:
    """One epoch of training: mean training loss, test metrics, bytes sent by each party, seconds.

    ``test_metrics`` holds the metrics of ``fit(..., metrics=...)`` on the test data, by name;
    ``test_accuracy`` is its accuracy (NaN when not computed), ``None`` without test data.
    """

    epoch: int
    train_loss: float
    samples: int
    seconds: float
    bytes_sent: dict[str, int]
    test_accuracy: float | None = None
    test_loss: float | None = None
    test_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class History:
    """Per-epoch statistics of a ``fit`` call."""

    epochs: list[EpochStats] = field(default_factory=list)

    @property
    def final(self) -> EpochStats:
        return self.epochs[-1]

    def losses(self) -> list[float]:
        return [e.train_loss for e in self.epochs]

    def metric(self, name: str) -> list[float]:
        """Test metric ``name`` after each epoch (e.g. ``history.metric("auc")``)."""
        missing = [e.epoch for e in self.epochs if name not in e.test_metrics]
        if missing:
            raise KeyError(f"metric {name!r} was not computed after epoch(s) {missing}; pass fit(..., metrics=[...])")
        return [e.test_metrics[name] for e in self.epochs]


def _check_trainable(model: object) -> Trainable:
    if not isinstance(model, Trainable):
        raise ConfigurationError(
            f"{type(model).__name__} is not a trainable model: derive it from splitnn.training.Trainable and define "
            "prepare, train_batch, eval_batch and parties (SplitNN and the topologies do)"
        )
    return model


def _show_progress(progress: bool | str | None) -> bool:
    """Whether a bar shows (a terminal or a notebook); see :mod:`splitnn.split.progress`."""
    return progress_mode(progress) == "bar"


def _epoch_plan(
    model: Trainable, name: str, n: int, batch_size: int, shuffle: bool, seed: int, epoch: int
) -> tuple[list[torch.Tensor], dict | None]:
    """An epoch's batches, and the ``epoch_batches`` arguments that made them (None: the model chose them)."""
    plan = model.epoch_plan(name, n, batch_size, shuffle=shuffle, seed=seed, epoch=epoch)
    if plan is not None:
        return plan, None
    order = dict(n=n, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch)
    return epoch_batches(**order), order


def fit(
    model: Trainable,
    data: object,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    test_data: object | None = None,
    shuffle: bool = True,
    seed: int = 0,
    initial_epoch: int = 0,
    progress: bool | str | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    metrics: Sequence[str] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: str | int = "epoch",
    resume: bool = False,
    retries: int = 3,
    pipeline: int = 1,
    log_dir: str | os.PathLike | None = None,
    accumulate: int = 1,
    clip_grad_norm: float | None = None,
) -> History:
    """Train ``model`` on ``data`` for ``epochs`` epochs.

    Batches follow :func:`epoch_batches` (``seed``, epoch), so a monolithic twin
    that uses the same function sees the same data order. Epochs are numbered from
    ``initial_epoch``: to continue an earlier ``fit`` of E epochs with the data order
    it would have used next, pass ``initial_epoch=E``. ``test_data`` is evaluated
    after each epoch, with ``metrics`` (names of :data:`splitnn.workers.metrics.METRIC_NAMES`;
    default: accuracy for classification losses), computed at the label holder.
    ``progress``: a bar per epoch where one renders (a terminal, a notebook), else plain lines on stderr
    -- a heartbeat during a long epoch and a line per epoch, never a ``\r`` frame (``None``, the default,
    and ``True``); ``"lines"``: plain lines only; ``False``: nothing (:mod:`splitnn.split.progress`).
    ``on_epoch`` is called with each epoch's stats (then no line per epoch is printed). ``log_dir`` writes
    TensorBoard event files and a CSV there: the loss of every batch and epoch, test metrics, learning rates,
    bytes per party per epoch and samples per second (:mod:`splitnn.split.training_log`; needs ``tensorboard``).

    ``pipeline`` is the number of batches in flight (split chains: ``SplitNN`` and the
    U-shape). With ``pipeline=K`` the data holder starts batch ``t + 1`` before the
    gradient of batch ``t`` has come back. Stage ``s`` computes batch ``t``'s forward and
    backward with its weights after the updates of batches ``0 .. t - d(s)`` of the epoch,
    where its depth ``d(s)`` is ``K`` at the data holder, 1 at the label holder and in
    between in proportion to the cross-party cuts after it (staleness at most ``K - 1``
    updates); every party applies its updates in batch order, and each epoch fills and
    drains the pipeline (see :mod:`splitnn.workers.schedules`).
    ``pipeline=1`` (the default) is lock-step, bit-identical to the monolithic model.

    The fine-tuning recipe (split chains, lock-step): ``accumulate=N``
    sums the gradients of N consecutive batches of an epoch (each batch's loss divided by the
    number of batches in its group; an epoch's last group may be shorter) before one optimizer
    step; ``clip_grad_norm=c`` clips the gradients by their global 2-norm over every party's
    parameters before each step, exactly ``torch.nn.utils.clip_grad_norm_(model.parameters(), c)``
    on the unsplit model: each party shares one norm per parameter tensor, never a gradient
    (:func:`splitnn.split.driver.clip_global_norm`). Learning-rate schedules and weight decay
    rules are part of the optimizer spec (:class:`splitnn.wire.OptimizerSpec`), stepped per step.

    Checkpoints (:mod:`splitnn.split.manifest`): with ``checkpoint_dir``, every party
    writes its own checkpoint of its segments (weights, optimizer state, random streams) at the
    start, after every epoch and -- with ``checkpoint_every=N`` -- every ``N`` batches, and the
    researcher writes ``checkpoint_dir/manifest.json``. ``resume=True`` continues the job that
    manifest records (or starts it when there is none): the result, weights included, is exactly
    that of an uninterrupted run, and the history returned holds the earlier epochs too. A resume
    whose model, parties, data or data order differ is refused, naming what differs. With
    ``pipeline=K`` and ``checkpoint_every=N`` the pipeline drains at every checkpoint (every N
    batches), in an interrupted run and an uninterrupted one alike.

    Faults (networked parties): a connection to a party that breaks and comes back costs nothing:
    the researcher's command stream is resumed where it stood, with no command lost or run twice
    (:mod:`splitnn.client.command_stream`), and a worker re-pulls a tensor from a peer whose link
    broke (:mod:`splitnn.server.peers`), in up to ``retries`` attempts each; no checkpoint is needed.
    When that fails -- a party restarted, or stayed unreachable
    (:class:`~splitnn.errors.WorkerUnreachableError`) -- ``fit`` waits (1 s, doubling, at most 30 s),
    reconnects every party -- a party that restarted gets the model installed again -- and puts
    every party back at the last checkpoint, up to ``retries`` times per fault (the count starts
    again after each epoch). Without ``checkpoint_dir`` there is nothing to resume from, and the
    fault is raised.
    """
    _check_trainable(model)
    check_positive("epochs", epochs)
    check_positive("batch_size", batch_size)
    check_pipeline_depth(pipeline)
    seed = check_seed(seed)  # an int from here on (numpy integers included)
    progress_mode(progress)  # refuses a value that is none of the modes
    check_positive("accumulate", accumulate)
    recipe = _check_recipe(model, accumulate, clip_grad_norm, pipeline, checkpoint_every if checkpoint_dir else None)
    model.check_pipeline(pipeline)
    if not isinstance(initial_epoch, int) or isinstance(initial_epoch, bool) or initial_epoch < 0:
        raise ConfigurationError(f"initial_epoch must be a non-negative integer, got {initial_epoch!r}")
    if resume and checkpoint_dir is None:
        raise ConfigurationError("resume=True continues a job from its checkpoints: give checkpoint_dir too")
    if checkpoint_dir is not None:
        check_every(checkpoint_every)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ConfigurationError(f"retries must be a non-negative integer, got {retries!r}")
    names = check_metric_names(metrics, model.loss)
    if metrics is not None and names and test_data is None:
        raise ConfigurationError(f"metrics {list(names)} are computed on test_data; give fit(..., test_data=...)")
    name, n = model.prepare(data)  # places data and checks shapes before any training
    test_name = model.prepare(test_data)[0] if test_data is not None else None
    if test_name is not None:
        model.check_metrics(test_name, names)
    history = History()
    position = Position(initial_epoch)
    job = None
    if checkpoint_dir is not None:
        order = {"seed": seed, "batch_size": batch_size, "shuffle": shuffle, "initial_epoch": initial_epoch}
        job = CheckpointJob(model, checkpoint_dir, checkpoint_every, data_summary(data, name, n), order)
        manifest = job.prepare_directory(resume=resume)
        if manifest is None:
            position.epoch_ledger = ledger_rows(model.ledger)
            job.start_ledger = position.epoch_ledger
        else:
            job.check_manifest(manifest)
            position = _restore(job, manifest, history)
    last = initial_epoch + epochs
    run = _Run(model, name, n, batch_size, shuffle, seed, last, progress, on_epoch, test_name, names, job, pipeline)
    if log_dir is not None:
        from splitnn.split.training_log import TrainingLog

        run.log = TrainingLog(log_dir, model)
    run.recipe = recipe
    attempts = 0
    with _resume_attempts(model, retries), contextlib.ExitStack() as logs:
        if run.log is not None:
            logs.callback(run.log.close)
        while position.epoch < last:
            try:
                if job is not None and job.manifest is None:
                    # step 0, before any batch: a crash before the first epoch ends can resume too; a fault during
                    # this first checkpoint (nothing trained yet) is retried like any other
                    job.save(position, [])
                position = run.epoch(position, history)
                attempts = 0  # an epoch ended (and was checkpointed): the next fault gets every retry again
            except WorkerUnreachableError as exc:
                attempts += 1
                if attempts > retries or not _reconnectable(model):
                    raise
                if job is None:  # the connections already tried to resume their streams: fail now, not after waits
                    raise WorkerUnreachableError(
                        f"{exc}; without checkpoints there is nothing to resume from: train with "
                        "fit(..., checkpoint_dir=DIR) (splitnn train --checkpoint-dir) to survive a party's crash"
                    ) from exc
                position = _recover(model, job, history, exc, attempts, retries)
    return history


@contextlib.contextmanager
def _resume_attempts(model: Trainable, retries: int) -> Iterator[None]:
    """Let each networked party's connection resume a broken stream up to ``retries`` times during ``fit``."""
    workers = [w for w in _model_workers(model) if isinstance(w, ReconnectingWorker) and hasattr(w, "retries")]
    before = [w.retries for w in workers]
    for w in workers:
        w.retries = retries
    try:
        yield
    finally:
        for w, n in zip(workers, before):
            w.retries = n


class _Run:
    """One epoch of :func:`fit` at a time, from a position (possibly mid-epoch) to the next epoch's start."""

    def __init__(
        self, model, name, n, batch_size, shuffle, seed, last, progress, on_epoch, test_name, metrics, job, pipeline
    ):
        self.model, self.name, self.n, self.batch_size, self.pipeline = model, name, n, batch_size, pipeline
        self.shuffle, self.seed, self.last, self.progress = shuffle, seed, last, progress
        self.on_epoch, self.test_name, self.metrics, self.job = on_epoch, test_name, metrics, job
        self.log = None  # a TrainingLog (fit's log_dir)
        self.recipe: tuple[int, float | None] | None = None  # (accumulate, clip_grad_norm): see fit

    def epoch(self, position: Position, history: History) -> Position:
        model, job, n = self.model, self.job, self.n
        epoch = position.epoch
        batches, order = _epoch_plan(model, self.name, n, self.batch_size, self.shuffle, self.seed, epoch)
        if position.batch == 0:
            position.loss_sum, position.seconds = 0.0, 0.0
            position.epoch_ledger = ledger_rows(model.ledger)
        start = time.perf_counter()
        bar = EpochProgress(
            progress_mode(self.progress), total=len(batches), initial=position.batch, epoch=epoch + 1, epochs=self.last
        )
        try:
            while position.batch < len(batches):
                stop = len(batches)
                if job is not None and isinstance(job.every, int):
                    stop = min(stop, position.batch + job.every - position.step % job.every)
                whole = position.batch == 0 and stop == len(batches)
                chunk = batches[position.batch : stop]
                logged = (self.log, position.step, epoch + 1) if self.log is not None else None
                position.loss_sum += _train_epoch(
                    model, self.name, chunk, order if whole else None, bar, self.pipeline, logged, self.recipe
                )
                position.step += stop - position.batch
                position.batch = stop
                if job is not None and job.due(position, len(batches)):
                    now = time.perf_counter()
                    position.seconds += now - start
                    start = now
                    job.save(position, history.epochs)
        finally:
            bar.close()
        position.seconds += time.perf_counter() - start
        sent = model.ledger.since(ledger_from_rows(position.epoch_ledger)).sent_by()
        stats = EpochStats(epoch + 1, position.loss_sum / n, n, position.seconds, sent)
        if self.test_name is not None:
            result = evaluate(model, self.test_name, metrics=self.metrics)
            stats.test_accuracy, stats.test_loss, stats.test_metrics = result.accuracy, result.loss, result.metrics
        following = Position(epoch + 1, 0, position.step, epoch_ledger=ledger_rows(model.ledger))
        if job is not None:
            job.save(following, [*history.epochs, stats])
        history.epochs.append(stats)
        if self.log is not None:
            self.log.epoch(stats)
        if self.on_epoch is not None:
            self.on_epoch(stats)
        else:
            shown = stats.test_metrics or ({} if self.test_name is None else {"accuracy": stats.test_accuracy})
            metrics = "".join(f", test {k} {v:.4f}" for k, v in shown.items())
            bar.epoch_line(f"done, loss {stats.train_loss:.4f}{metrics}")
        return following


#: Seconds before the first reconnection attempt after a fault; doubled per attempt, at most RETRY_MAX_WAIT.
RETRY_WAIT = 1.0
RETRY_MAX_WAIT = 30.0


def _model_workers(model: Trainable) -> list:
    return list({w.name: w for w in model.party_workers()}.values())


def _reconnectable(model: Trainable) -> bool:
    return any(isinstance(w, ReconnectingWorker) for w in _model_workers(model))


def _restore(job, manifest, history: History) -> Position:
    """Put every party back at ``manifest``'s checkpoint and ``history`` at its epochs; the position to go on from."""
    position = job.restore(manifest)
    history.epochs = [EpochStats(**e) for e in job.history()]
    return position


def _recover(model, job, history: History, fault: Exception, attempt: int, retries: int) -> Position:
    """After ``fault``: wait, reconnect every party (reinstalled where it lost the session), and put every
    party back at the last checkpoint. Raises when ``retries`` attempts did not get there."""
    last_error: Exception = fault
    while True:
        time.sleep(min(RETRY_WAIT * 2 ** (attempt - 1), RETRY_MAX_WAIT))
        try:
            for worker in _model_workers(model):
                if isinstance(worker, ReconnectingWorker):
                    worker.reconnect()
            if job.manifest is None:  # the fault hit the first checkpoint: nothing was trained, start again
                return _start_again(model, job, history)
            return _restore(job, job.manifest, history)
        except WorkerUnreachableError as exc:
            last_error = exc
            attempt += 1
            if attempt > retries:
                raise WorkerUnreachableError(
                    f"gave up after {retries} attempts to resume: {last_error} (the fault: {fault})"
                ) from fault


def _start_again(model, job, history: History) -> Position:
    """The position to start a job from when its first checkpoint did not complete: no batch was trained, so
    every party's segments are as installed; what a broken step left at a party is released."""
    for worker in _model_workers(model):
        worker.release()
    history.epochs = []
    model.ledger.clear()  # as it was when the job started (not counting what reconnecting sent)
    model.ledger.merge(ledger_from_rows(job.start_ledger).links())
    return Position(int(job.order["initial_epoch"]), epoch_ledger=list(job.start_ledger))


def _check_recipe(
    model: Trainable, accumulate: int, clip: float | None, pipeline: int, every: object
) -> tuple[int, float | None] | None:
    """``(accumulate, clip_grad_norm)`` when the fine-tuning recipe is asked for (checked), else None."""
    if accumulate == 1 and clip is None:
        return None
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip <= 0
    ):
        raise ConfigurationError(f"clip_grad_norm must be a finite number > 0 (e.g. 1.0), got {clip!r}")
    if pipeline != 1:
        raise ConfigurationError("accumulate= and clip_grad_norm= train lock-step: leave pipeline=1")
    model.check_recipe()
    if isinstance(every, int) and not isinstance(every, bool) and every % accumulate:
        raise ConfigurationError(
            f"checkpoint_every={every} would checkpoint inside a group of accumulate={accumulate} batches; "
            "give a multiple of accumulate"
        )
    return accumulate, None if clip is None else float(clip)


def _train_epoch(
    model: Trainable,
    name: str,
    batches: list[torch.Tensor],
    order: dict | None,
    bar: EpochProgress,
    pipeline: int,
    logged: tuple | None = None,
    recipe: tuple[int, float | None] | None = None,
) -> float:
    """Train on every batch (shipped whole when the model can, else batch by batch); return the loss sum.
    ``logged``: (TrainingLog, global step of the first batch, epoch number) to log each batch's loss."""
    total, done = 0.0, 0

    def on_batch(stats: LossStats) -> None:
        nonlocal total, done
        total += stats.loss * stats.count
        if logged is not None:
            logged[0].batch(logged[1] + done, logged[2], stats.loss)
        if done % 50 == 0:
            bar.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
        done += 1
        bar.update(1)

    if recipe is None:
        model.train_epoch(name, batches, on_batch, order=order, pipeline=pipeline)
        return total
    accumulate, clip = recipe
    for i in range(0, len(batches), accumulate):
        for stats in model.train_steps(name, batches[i : i + accumulate], clip_grad_norm=clip):
            on_batch(stats)
    return total


def evaluate(
    model: Trainable,
    data: object,
    *,
    batch_size: int = 1000,
    progress: bool | None = False,
    metrics: Sequence[str] | None = None,
) -> EvalResult:
    """Mean loss and ``metrics`` of ``model`` on ``data`` (no gradients, evaluation mode).

    ``metrics`` names metrics of :data:`splitnn.workers.metrics.METRIC_NAMES` (default:
    accuracy for classification losses, none for regression). Accuracy adds up each
    batch's correct count; the others are computed by the label holder over the outputs
    it kept during the evaluation, and only their values reach this process.
    """
    _check_trainable(model)
    check_positive("batch_size", batch_size)
    names = check_metric_names(metrics, model.loss)
    name, n = model.prepare(data)
    model.check_metrics(name, names)
    extra = [m for m in names if m != "accuracy"]
    keep = f"eval-{secrets.token_hex(8)}" if extra else None
    before = model.ledger.snapshot()
    loss_sum, correct, classifies = 0.0, 0, True
    plan = model.eval_plan(name, n, batch_size)
    for idx in tqdm(
        plan if plan is not None else epoch_batches(n, batch_size, shuffle=False),
        desc="evaluate",
        unit="batch",
        leave=False,
        disable=not _show_progress(progress),
    ):
        stats = model.eval_batch(name, idx, keep=keep) if keep is not None else model.eval_batch(name, idx)
        loss_sum += stats.loss * stats.count
        correct += stats.correct
        classifies = classifies and stats.correct >= 0  # -1: the output is not a classification
    values = {"accuracy": correct / n if classifies else math.nan} if "accuracy" in names else {}
    if keep is not None:
        values.update(model.metrics(keep, extra))
    values = {m: values[m] for m in names}
    accuracy = values.get("accuracy", math.nan)
    return EvalResult(accuracy, loss_sum / n, n, model.ledger.since(before).sent_by(), values)
