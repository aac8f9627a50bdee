"""A party's own checkpoint of the segments it hosts: weights, optimizer state, random streams.

:class:`PartyCheckpoint` writes and reads one party's checkpoints (its docstring gives the file layout);
:func:`job_tag`, :func:`held_steps` and :func:`segment_identity` name and find them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from splitnn.errors import CheckpointError, SpecError, WireError
from splitnn.fileio import atomic_path, remove_stale_temps
from splitnn.wire.cut_codec import CutEncoder
from splitnn.wire.fingerprint import fingerprint
from splitnn.wire.nested import decode_nested, encode_nested
from splitnn.wire.optim_spec import STEP_KEY

__all__ = [
    "CHECKPOINT_FORMAT",
    "PartyCheckpoint",
    "check_job_id",
    "job_tag",
    "segment_identity",
    "held_steps",
    "save_party_checkpoint",
    "load_party_checkpoint",
]

#: The ``format`` field of a party's checkpoint metadata.
CHECKPOINT_FORMAT = "splitnn-party-checkpoint-1"
#: Checkpoints of one job a party keeps (the newest); older ones are deleted after a write.
DEFAULT_KEEP = 2

_META_KEY = "splitnn.checkpoint"
_JOB = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_STEP_FILE = re.compile(r"^step-(\d{1,18})\.safetensors$")


class HostedSegment(Protocol):
    """What a party checkpoints of one segment."""

    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    send_out: CutEncoder | None  # the codec of the activation it sends (None: plain)
    send_grad: CutEncoder | None  # the codec of the gradient it sends back


#: Where a party keeps its checkpoints.
StateDir = str | os.PathLike
#: The segments of a party's checkpoint, by their label in the model.
Labelled = Mapping[str, HostedSegment]


@dataclass(frozen=True)
class PartyCheckpoint:
    """A checkpoint a party holds: its step, the sha256 of its file, its size in bytes.

    Each party writes its part locally; weights never travel for a checkpoint. One checkpoint is
    one safetensors file, ``<state_dir>/<job tag>/step-<step>.safetensors``, written atomically
    (a temporary file renamed into place, so a crash leaves the previous checkpoint or none):

    * tensors ``w/<segment>/<name>``: each segment's ``state_dict()`` (parameters and buffers);
    * tensors ``o/<segment>/...``: its optimizer's state (momentum, Adam's moments and steps),
      whose nested Python structure (``param_groups``, integer keys, tuples) is kept as JSON in
      the file's metadata by :mod:`splitnn.wire.nested`;
    * tensors ``r/...``: the party's random streams -- the process's global generator (dropout),
      and every ``torch.Generator`` a segment's layers own (a noise defense's stream);
    * tensors ``e/<segment>/<out|grad>/<value>``: the error feedback of a lossy codec at the
      segment's cuts (``topk``'s residuals; :class:`~splitnn.wire.cut_codec.CutEncoder`), which
      the next batch's encoding adds back;
    * metadata ``splitnn.checkpoint``: JSON with the format, the step, the party, each segment's
      fingerprint and optimizer, and the researcher's note (epoch, batch).

    Segments are named by their *label* in the model (``s0``, ``h1.s0``, ...), not by their key,
    which is random per run: a resumed run has new keys for the same segments. The job tag is a
    hash of the job id (a secret the researcher keeps in its manifest), so the directory listing
    does not reveal it. A party killed while writing leaves a hidden temporary file, which no step
    listing counts and the party's next write or load of that job deletes. Nothing is unpickled when
    loading: safetensors and JSON only.
    """

    step: int
    digest: str
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "digest": self.digest, "bytes": self.nbytes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PartyCheckpoint:
        return cls(int(d["step"]), str(d["digest"]), int(d.get("bytes", 0)))


def check_job_id(job: object) -> str:
    """``job`` if it is a job id (16-128 characters from ``[A-Za-z0-9_-]``), else a CheckpointError."""
    if not isinstance(job, str) or not _JOB.match(job):
        raise CheckpointError(f"a checkpoint job id is 16-128 characters from [A-Za-z0-9_-], got {job!r:.40}")
    return job


def job_tag(job: str) -> str:
    """The directory name of job ``job``'s checkpoints: a hash, so that listing it reveals no job id."""
    return hashlib.sha256(("splitnn-job:" + check_job_id(job)).encode()).hexdigest()[:32]


def segment_identity(module: nn.Module) -> str:
    """A segment's fingerprint, or -- for an in-process module that has no spec (a class that is
    neither registered nor importable) -- ``structure:`` and a hash of its class names and its
    parameter and buffer names, shapes and dtypes (weaker: it cannot see code changes)."""
    try:
        return fingerprint(module)
    except SpecError:
        h = hashlib.sha256()
        for name, m in module.named_modules():
            h.update(f"{name}:{type(m).__module__}.{type(m).__qualname__}\n".encode())
        for name, t in module.state_dict().items():
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        return "structure:" + h.hexdigest()


def _job_dir(state_dir: Path, job: str) -> Path:
    return Path(state_dir) / job_tag(job)


def _step_path(state_dir: Path, job: str, step: int) -> Path:
    return _job_dir(state_dir, job) / f"step-{step}.safetensors"


def held_steps(state_dir: StateDir, job: str) -> list[int]:
    """The steps of job ``job`` a party holds checkpoints of, ascending."""
    directory = _job_dir(Path(state_dir), job)
    if not directory.is_dir():
        return []
    steps = [int(m.group(1)) for p in directory.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(steps)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _generators(module: nn.Module) -> dict[str, Any]:
    """The random streams ``module``'s layers own, by ``<submodule path>/<attribute>``: a
    ``torch.Generator``, or an object with ``get_rng_states()``/``set_rng_states()``."""
    found: dict[str, Any] = {}
    for path, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Generator) or (
                callable(getattr(value, "get_rng_states", None)) and callable(getattr(value, "set_rng_states", None))
            ):
                found[f"{path or '.'}/{attr}"] = value
    return found


def save_party_checkpoint(
    state_dir: StateDir,
    job: str,
    step: int,
    *,
    worker: str,
    segments: Labelled,
    note: Mapping[str, Any] | None = None,
    keep: int = DEFAULT_KEEP,
) -> PartyCheckpoint:
    """Write party ``worker``'s checkpoint of ``segments`` (label -> hosted segment) at ``step``.

    Atomic; replaces a checkpoint of the same step; then deletes all but the ``keep`` newest.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"a checkpoint step is a non-negative integer, got {step!r}")
    tensors: dict[str, torch.Tensor] = {}
    meta_segments: dict[str, Any] = {}
    for label, hosted in segments.items():
        if not _LABEL.match(label):
            raise CheckpointError(f"segment label {label!r} is not 1-64 characters from [A-Za-z0-9_.-]")
        for name, t in hosted.module.state_dict().items():
            tensors[f"w/{label}/{name}"] = t.detach().to("cpu").clone().contiguous()
        entry: dict[str, Any] = {"identity": segment_identity(hosted.module), "optimizer": None, "generators": []}
        if hosted.optimizer is not None:
            encoded, opt_tensors = encode_nested(hosted.optimizer.state_dict(), prefix=f"o/{label}/")
            tensors.update({k: v.to("cpu").clone().contiguous() for k, v in opt_tensors.items()})
            entry["optimizer"] = {"class": type(hosted.optimizer).__name__, "state": encoded}
        for where, gen in _generators(hosted.module).items():
            states = {"": gen.get_state()} if isinstance(gen, torch.Generator) else dict(gen.get_rng_states())
            for sub, state in states.items():
                tensors[f"r/{label}/{where}/{sub}"] = state.clone().contiguous()
            entry["generators"].append({"where": where, "keys": sorted(states)})
        entry["feedback"] = {}
        for direction, encoder in _encoders(hosted):
            residuals = encoder.feedback_state()
            for i, r in residuals.items():
                tensors[f"e/{label}/{direction}/{i}"] = r.detach().to("cpu").clone().contiguous()
            entry["feedback"][direction] = sorted(residuals)
        meta_segments[label] = entry
    tensors["r/global"] = torch.get_rng_state().clone()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    for i, state in enumerate(cuda_states):
        tensors[f"r/cuda/{i}"] = state.clone()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "job": job_tag(job),
        "step": step,
        "worker": worker,
        "segments": meta_segments,
        "cuda_devices": len(cuda_states),
        "note": dict(note or {}),
    }
    directory = _job_dir(Path(state_dir), job)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(directory, "step-*.safetensors")  # what a write killed half-way left behind
    path = _step_path(Path(state_dir), job, step)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta, allow_nan=False)})
        with open(tmp, "rb") as f:  # on disk before the rename makes it the checkpoint
            os.fsync(f.fileno())
    _fsync_dir(directory)
    for old in held_steps(state_dir, job)[:-keep] if keep > 0 else []:
        _step_path(Path(state_dir), job, old).unlink(missing_ok=True)
    return PartyCheckpoint(step, _digest(path), path.stat().st_size)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_party_checkpoint(
    state_dir: StateDir, job: str, step: int, *, worker: str, segments: Labelled, digest: str | None = None
) -> PartyCheckpoint:
    """Load party ``worker``'s checkpoint at ``step`` into ``segments`` (label -> hosted segment).

    Refuses, with a :class:`CheckpointError` naming what differs and before changing anything,
    a checkpoint that is missing, of another format, of other segments, of segments whose
    fingerprint differs, or whose optimizers differ in class or hyperparameters; and, given
    ``digest`` (the sha256 the researcher's manifest records), a file that is not that one.
    """
    path = _step_path(Path(state_dir), job, step)
    remove_stale_temps(path.parent, "step-*.safetensors")  # a resume after a kill mid-write: the write's leftovers
    if not path.is_file():
        held = held_steps(state_dir, job)
        raise CheckpointError(
            f"worker {worker!r} holds no checkpoint of step {step} for this job"
            + (f" (it holds steps {held})" if held else " (it holds none: was its state directory changed or lost?)")
        )
    found = _digest(path)
    if digest is not None and found != digest:
        raise CheckpointError(
            f"worker {worker!r}: its checkpoint of step {step} is not the one the researcher's manifest records "
            f"(sha256 {found[:16]}... here, {str(digest)[:16]}... in the manifest); was it written by another run?"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not a dict)
    except Exception as exc:  # safetensors raises its own errors for a damaged file
        raise CheckpointError(f"worker {worker!r}: checkpoint of step {step} is damaged ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"worker {worker!r}: {path.name} is not a {CHECKPOINT_FORMAT} file")
    saved = meta.get("segments", {})
    if set(saved) != set(segments):
        raise CheckpointError(
            f"worker {worker!r}: its checkpoint of step {step} holds segments {sorted(saved)}, but the model "
            f"places {sorted(segments)} here; resume the same model with the same parties"
        )
    plan: list[tuple[HostedSegment, dict[str, torch.Tensor], Any, list]] = []
    for label, hosted in segments.items():
        entry = saved[label]
        identity = segment_identity(hosted.module)
        if entry.get("identity") != identity:
            raise CheckpointError(
                f"worker {worker!r}: segment {label} differs from the checkpoint's (fingerprint "
                f"{str(entry.get('identity'))[:16]}... in the checkpoint, {identity[:16]}... now); resume the "
                f"same model"
            )
        weights = {k[len(f"w/{label}/") :]: v for k, v in tensors.items() if k.startswith(f"w/{label}/")}
        optim = _optimizer_state(worker, label, entry.get("optimizer"), hosted.optimizer, tensors)
        feedback = _feedback_state(worker, label, entry.get("feedback") or {}, hosted, tensors)
        plan.append((hosted, weights, optim, entry.get("generators", []), feedback))
    for hosted, weights, optim, gens, feedback in plan:  # every check passed: now change state
        hosted.module.load_state_dict(weights)
        for direction, encoder in _encoders(hosted):
            encoder.load_feedback_state(feedback.get(direction, {}))
        if optim is not None:
            hosted.optimizer.load_state_dict(optim)
        owned = _generators(hosted.module)
        label = next(lbl for lbl, h in segments.items() if h is hosted)
        for g in gens:
            gen = owned.get(g["where"])
            if gen is None:
                continue
            states = {k: tensors[f"r/{label}/{g['where']}/{k}"] for k in g["keys"]}
            if isinstance(gen, torch.Generator):
                gen.set_state(states[""])
            else:
                gen.set_rng_states(states)
    torch.set_rng_state(tensors["r/global"])
    cuda = int(meta.get("cuda_devices", 0))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"r/cuda/{i}"] for i in range(cuda)])
    return PartyCheckpoint(step, found, path.stat().st_size)


def _encoders(hosted: HostedSegment) -> list[tuple[str, CutEncoder]]:
    """The segment's codecs at its cuts, by direction (``out``: its activation; ``grad``: its input's gradient)."""
    pairs = (("out", getattr(hosted, "send_out", None)), ("grad", getattr(hosted, "send_grad", None)))
    return [(d, e) for d, e in pairs if e is not None]


def _feedback_state(
    worker: str, label: str, saved: Mapping[str, Any], hosted: HostedSegment, tensors: Mapping[str, torch.Tensor]
) -> dict[str, dict[int, torch.Tensor]]:
    """The codecs' residuals to restore, by direction, on the segment's device; refuses error feedback saved
    for a cut that compresses nothing now."""
    have = dict(_encoders(hosted))
    device = next((t.device for t in hosted.module.state_dict().values()), torch.device("cpu"))
    out: dict[str, dict[int, torch.Tensor]] = {}
    for direction, indices in saved.items():
        if not indices:
            continue
        if direction not in have:
            raise CheckpointError(
                f"worker {worker!r}: segment {label} was checkpointed with a compressing codec at its "
                f"{'output' if direction == 'out' else 'input'} cut, and has none now; resume with the same compression"
            )
        out[direction] = {int(i): tensors[f"e/{label}/{direction}/{i}"].to(device) for i in indices}
    return out


def _optimizer_state(
    worker: str, label: str, saved: Any, optimizer: torch.optim.Optimizer | None, tensors: dict[str, torch.Tensor]
) -> dict | None:
    if saved is None and optimizer is None:
        return None
    if saved is None or optimizer is None:
        have = "no optimizer" if optimizer is None else type(optimizer).__name__
        had = "no optimizer" if saved is None else saved.get("class")
        raise CheckpointError(
            f"worker {worker!r}: segment {label} had {had} in the checkpoint and has {have} now; resume with the "
            f"same optimizers"
        )
    if saved.get("class") != type(optimizer).__name__:
        raise CheckpointError(
            f"worker {worker!r}: segment {label}'s optimizer was {saved.get('class')} in the checkpoint and is "
            f"{type(optimizer).__name__} now; resume with the same optimizers"
        )
    try:
        state = decode_nested(saved["state"], tensors)
    except (WireError, KeyError) as exc:
        raise CheckpointError(f"worker {worker!r}: segment {label}'s optimizer state is damaged ({exc})") from None
    now = optimizer.state_dict()["param_groups"]
    then = state.get("param_groups", [])
    if len(now) != len(then):
        raise CheckpointError(
            f"worker {worker!r}: segment {label}'s optimizer had {len(then)} parameter groups, now {len(now)}"
        )
    for g_now, g_then in zip(now, then):
        for k in sorted(set(g_now) | set(g_then)):
            if k == "params" or (k in ("lr", STEP_KEY) and STEP_KEY in now[0]):
                continue  # a scheduled learning rate and its step count move on: the checkpoint's are loaded
            a, b = g_then.get(k), g_now.get(k)
            if _plain(a) != _plain(b):
                raise CheckpointError(
                    f"worker {worker!r}: segment {label}'s optimizer had {k}={a!r} in the checkpoint and has "
                    f"{k}={b!r} now; resume with the same optimizer settings"
                )
    return state


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
