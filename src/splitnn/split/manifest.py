"""Checkpoints of a training job: each party keeps its own; the researcher keeps a manifest.

:class:`CheckpointJob` writes the manifest after every party's checkpoint and checks it on resume
(its docstring says what the manifest holds); :class:`Position` is where training stands.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from splitnn.accounting import Ledger
from splitnn.accounting.ledger import LinkTotal
from splitnn.errors import CheckpointError, ConfigurationError
from splitnn.fileio import atomic_write_text, remove_stale_temps
from splitnn.split.stage import Slot
from splitnn.split.trainable import Trainable
from splitnn.wire.fingerprint import combine_fingerprints
from splitnn.workers import CheckpointWorker, VirtualWorker, Worker
from splitnn.workers.checkpoint import segment_identity

__all__ = ["MANIFEST_FORMAT", "MANIFEST_NAME", "Position", "CheckpointJob", "check_every", "data_summary"]

MANIFEST_FORMAT = "splitnn-manifest-1"
MANIFEST_NAME = "manifest.json"


def check_every(every: object) -> str | int:
    """``checkpoint_every``: ``"epoch"`` or a positive number of batches."""
    if every == "epoch":
        return "epoch"
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigurationError(f'checkpoint_every must be "epoch" or a positive number of batches, got {every!r}')
    return every


def data_summary(data: object, name: str, size: int) -> dict[str, Any]:
    """What the manifest records of a training dataset: its size, and a sha256 of its tensors when the
    researcher holds them (a :class:`~splitnn.data.Dataset`, :class:`VerticalData`), or the name of
    a dataset the workers hold (which they alone can read)."""
    tensors: list[torch.Tensor] = []
    for attr in ("features", "parts", "labels"):
        value = getattr(data, attr, None)
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in value):
            tensors.extend(value)
    summary: dict[str, Any] = {"size": size, "digest": None, "name": name if isinstance(data, str) else None}
    if tensors:
        h = hashlib.sha256()
        for t in tensors:
            t = t.detach().to("cpu").contiguous()
            h.update(f"{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
        summary["digest"] = h.hexdigest()
    return summary


@dataclass
class Position:
    """Where a training job stands: in epoch ``epoch`` (0-based), ``batch`` batches done, ``step``
    batches done since the job started; the epoch's loss sum and seconds so far, and the ledger
    as it was when the epoch started (for the epoch's bytes)."""

    epoch: int
    batch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    seconds: float = 0.0
    epoch_ledger: list[list[Any]] = field(default_factory=list)


def ledger_rows(ledger: Ledger) -> list[list[Any]]:
    return [[l.src, l.dst, l.kind, l.count, l.nbytes] for l in ledger.links()]


def ledger_from_rows(rows: Sequence[Sequence[Any]]) -> Ledger:
    ledger = Ledger()
    ledger.merge(LinkTotal(str(a), str(b), str(k), int(c), int(n)) for a, b, k, c, n in rows)
    return ledger


class CheckpointJob:
    """One training job's checkpoints. :func:`~splitnn.training.fit` drives it.

    ``fit(..., checkpoint_dir=DIR, checkpoint_every="epoch" | N)`` has every party write its own
    checkpoint of the segments it hosts (weights, optimizer state, random streams;
    :mod:`splitnn.workers.checkpoint`) after every epoch, or every ``N`` batches and every epoch,
    and then writes ``DIR/manifest.json`` atomically: the job's secret id, where training stands
    (epoch, batch, step, the epoch's loss so far), the data order (seed, batch size, shuffle), the
    data's size and digest, the model's and each party's fingerprint, the ledger totals, the
    history so far, and which checkpoint (step and sha256) each party holds. Weights never travel
    for a checkpoint: a networked party writes into its own ``--state-dir``; an in-process worker
    without a state directory of its own writes under ``DIR/parties/<name>``.

    ``fit(..., checkpoint_dir=DIR, resume=True)`` checks the manifest against the model, its
    parties and the data, asks every party for the steps it holds, has each load the one the
    manifest names (checking its sha256 before changing anything), puts the ledger totals and the
    history back, and continues with the batches the interrupted run would have trained next.
    Any difference is a :class:`~splitnn.errors.CheckpointError` naming it. ``resume=True`` with
    no manifest in ``DIR`` starts the job (so re-running one command resumes or starts it).

    Args:
        model: the model being trained; it must list its segments (``checkpoint_segments()``).
        directory: where the manifest lives (and in-process parties' checkpoints without a state dir).
        every: ``"epoch"`` or a number of batches.
        data: the training data's :func:`data_summary`.
        order: the data order: ``seed``, ``batch_size``, ``shuffle``, ``initial_epoch``.
    """

    def __init__(
        self, model: Trainable, directory: str | os.PathLike, every: str | int, data: dict, order: dict
    ) -> None:
        self.slots: list[Slot] = model.checkpoint_segments()  # refuses a model that cannot be checkpointed
        self.model = model
        self.directory = Path(directory)
        self.every = check_every(every)
        self.data, self.order = data, order
        self.job = secrets.token_hex(16)
        self.manifest: dict[str, Any] | None = None
        self.start_ledger: list[list[Any]] = []  # the ledger's rows when a new job started (fit sets it)
        for slot in self.slots:
            if not isinstance(slot.worker, CheckpointWorker):
                raise ConfigurationError(
                    f"worker {slot.worker.name!r} cannot keep checkpoints (it lacks checkpoint_steps/save_checkpoint/"
                    f"load_checkpoint); use splitnn.VirtualWorker or a `splitnn worker --state-dir DIR` party"
                )
        self.identities = {s.label: segment_identity(s.module) for s in self.slots}

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_NAME

    def workers(self) -> dict[str, Worker]:
        return {s.worker.name: s.worker for s in self.slots}

    def _segments_of(self, party: str) -> dict[str, str]:
        return {s.label: s.key for s in self.slots if s.worker.name == party}

    def _model_record(self) -> dict[str, Any]:
        segments = [
            {"label": s.label, "party": s.worker.name, "identity": self.identities[s.label]} for s in self.slots
        ]
        parties = {}
        for party in self.workers():
            mine = [f"{s.label}={self.identities[s.label]}" for s in self.slots if s.worker.name == party]
            parties[party] = combine_fingerprints([party, *mine])
        model_fp = combine_fingerprints(f"{s['label']}@{s['party']}={s['identity']}" for s in segments)
        loss = self.model.loss
        return {
            "type": type(self.model).__name__,
            "fingerprint": model_fp,
            "segments": segments,
            "party_fingerprints": parties,
            "loss": loss if isinstance(loss, str) else None,
        }

    # -- starting -------------------------------------------------------------------------------
    def prepare_directory(self, *, resume: bool) -> dict[str, Any] | None:
        """Create the directory; the manifest to resume from (None: a new job). Refuses overwriting a job."""
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigurationError(f"checkpoint_dir {self.directory} is a file, not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.directory, MANIFEST_NAME)  # a manifest write killed half-way
        for worker in self.workers().values():
            if isinstance(worker, VirtualWorker) and worker.state_dir is None:
                worker.state_dir = self.directory / "parties" / worker.name
        if not self.manifest_path.exists():
            return None
        if not resume:
            raise CheckpointError(
                f"{self.manifest_path} holds a checkpoint of a training job; pass resume=True (splitnn train "
                f"--resume) to continue it, or choose another checkpoint directory"
            )
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.manifest_path} cannot be read: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"{self.manifest_path} is not a {MANIFEST_FORMAT} file")
        return manifest

    def check_manifest(self, manifest: dict[str, Any]) -> None:
        """Refuse resuming ``manifest`` with this model, parties, data or data order, naming what differs."""
        where = f"the checkpoint in {self.directory}"
        ours = self._model_record()
        theirs = manifest.get("model", {})
        parties_then = list(theirs.get("party_fingerprints", {}))
        parties_now = list(ours["party_fingerprints"])
        if parties_then != parties_now:
            raise CheckpointError(
                f"{where} was trained by parties {parties_then}; this model's parties are {parties_now}"
            )
        if theirs.get("type") != ours["type"]:
            raise CheckpointError(f"{where} is of a {theirs.get('type')}; this model is a {ours['type']}")
        then = {s["label"]: s for s in theirs.get("segments", [])}
        now = {s["label"]: s for s in ours["segments"]}
        if list(then) != list(now):
            raise CheckpointError(f"{where} has segments {list(then)}; this model has {list(now)}")
        for label, seg in now.items():
            old = then[label]
            if old["party"] != seg["party"]:
                raise CheckpointError(
                    f"{where}: segment {label} was at {old['party']!r}; this model places it at {seg['party']!r}"
                )
            if old["identity"] != seg["identity"]:
                raise CheckpointError(
                    f"{where}: segment {label} at {seg['party']!r} differs (fingerprint {old['identity'][:16]}... "
                    f"in the checkpoint, {seg['identity'][:16]}... now); resume the same model"
                )
        if theirs.get("loss") != ours["loss"]:
            raise CheckpointError(
                f"{where} was trained with loss {theirs.get('loss')!r}; this model uses {ours['loss']!r}"
            )
        data = manifest.get("data", {})
        for key, what in (("size", "samples"), ("digest", "content (sha256)"), ("name", "dataset name")):
            if data.get(key) != self.data.get(key):
                raise CheckpointError(
                    f"{where} was trained on other data: {what} {data.get(key)!r} in the checkpoint, "
                    f"{self.data.get(key)!r} now"
                )
        order = manifest.get("order", {})
        for key in ("seed", "batch_size", "shuffle", "initial_epoch"):
            if order.get(key) != self.order.get(key):
                raise CheckpointError(
                    f"{where} used {key}={order.get(key)!r}; this run asks for {key}={self.order.get(key)!r}, which "
                    f"would change the data order"
                )

    def restore(self, manifest: dict[str, Any]) -> Position:
        """Every party loads the checkpoint the manifest names; the ledger and the model's own state
        come back. Refuses (before any party changes) when parties hold different steps."""
        step = int(manifest["step"])
        held = manifest.get("parties", {})
        steps = {name: w.checkpoint_steps(manifest["job"]) for name, w in self.workers().items()}
        missing = {name: s for name, s in steps.items() if step not in s}
        if missing:
            desc = ", ".join(f"{n} {s or 'none'}" for n, s in steps.items())
            raise CheckpointError(
                f"the parties hold checkpoints of different steps ({desc}); the manifest in {self.directory} is at "
                f"step {step}, which {sorted(missing)} do not hold"
            )
        for worker in self.workers().values():
            worker.release()  # what a broken step left behind: stored tensors, pending losses
        for name, worker in self.workers().items():
            digest = held.get(name, {}).get("digest")
            worker.load_checkpoint(manifest["job"], step, self._segments_of(name), digest=digest)
        self.job = manifest["job"]
        self.manifest = manifest
        ledger = self.model.ledger
        ledger.clear()
        ledger.merge(ledger_from_rows(manifest.get("ledger", [])).links())
        if manifest.get("state") is not None:
            self.model.restore_checkpoint_state(manifest["state"])
        p = manifest["position"]
        return Position(
            int(p["epoch"]), int(p["batch"]), step, float(p["loss_sum"]), float(p["seconds"]), p["epoch_ledger"]
        )

    def history(self) -> list[dict[str, Any]]:
        """The completed epochs' stats recorded in the manifest resumed from."""
        return list((self.manifest or {}).get("history", []))

    # -- saving ---------------------------------------------------------------------------------
    def save(self, position: Position, history: Sequence[object]) -> None:
        """Every party writes its checkpoint at ``position.step``; then the manifest is replaced."""
        note = {"epoch": position.epoch, "batch": position.batch}
        parties = {}
        for name, worker in self.workers().items():
            info = worker.save_checkpoint(self.job, position.step, self._segments_of(name), note=note)
            parties[name] = {"step": int(info["step"]), "digest": str(info["digest"]), "bytes": int(info["bytes"])}
        manifest = {
            "format": MANIFEST_FORMAT,
            "job": self.job,
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "step": position.step,
            "position": asdict(position),
            "every": self.every,
            "order": self.order,
            "data": self.data,
            "model": self._model_record(),
            "parties": parties,
            "ledger": ledger_rows(self.model.ledger),
            "history": [asdict(h) if not isinstance(h, dict) else h for h in history],
            "state": self.model.checkpoint_state(),
        }
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1, allow_nan=True))
        self.manifest = manifest

    def due(self, position: Position, epoch_batches: int) -> bool:
        """Whether a checkpoint is due after ``position`` (mid-epoch only; every epoch end is one)."""
        return isinstance(self.every, int) and 0 < position.batch < epoch_batches and position.step % self.every == 0
