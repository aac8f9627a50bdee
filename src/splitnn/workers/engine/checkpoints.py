"""A party's checkpoints of the segments it hosts, written and read locally (:mod:`splitnn.workers.checkpoint`).

State: ``state_dir``, where this party keeps its checkpoints (None: it keeps none).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from splitnn.errors import CheckpointError
from splitnn.workers.checkpoint import held_steps, job_tag, load_party_checkpoint, save_party_checkpoint
from splitnn.workers.engine.hosted import Hosted


class Checkpoints:
    """Save and load this party's part of a training job's checkpoint (see :class:`CheckpointWorker`)."""

    def _init_checkpoints(self, state_dir: str | os.PathLike | None) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None

    def checkpoint_steps(self, job: str) -> list[int]:
        """The steps of job ``job`` this party holds checkpoints of, ascending."""
        return held_steps(self._checkpoint_dir(), job)

    def save_checkpoint(
        self, job: str, step: int, segments: Mapping[str, str], *, note: Mapping[str, object] | None = None
    ) -> dict:
        """Write this party's checkpoint of ``segments`` (label -> key) at ``step`` of job ``job``, locally
        (weights, optimizer state, random streams; see :mod:`splitnn.workers.checkpoint`).
        Returns ``{"step", "digest", "bytes"}``."""
        info = save_party_checkpoint(
            self._checkpoint_dir(), job, step, worker=self.name, segments=self._labelled(segments), note=note
        )
        if self.audit is not None:
            self.audit.write("checkpoint", session=self.audit_session, job=job_tag(job), step=step, bytes=info.nbytes)
        return info.to_dict()

    def load_checkpoint(self, job: str, step: int, segments: Mapping[str, str], *, digest: str | None = None) -> dict:
        """Load this party's checkpoint at ``step`` of job ``job`` into ``segments`` (label -> key); a
        :class:`~splitnn.errors.CheckpointError` naming what differs when it does not match them, or
        (given ``digest``) when it is not that file. Returns ``{"step", "digest", "bytes"}``."""
        for key in segments.values():
            self._trainable(key)
        info = load_party_checkpoint(
            self._checkpoint_dir(), job, step, worker=self.name, segments=self._labelled(segments), digest=digest
        )
        for hosted in self._labelled(segments).values():
            hosted.inp = hosted.out = None
        if self.audit is not None:
            self.audit.write("restore", session=self.audit_session, job=job_tag(job), step=step)
        return info.to_dict()

    def _checkpoint_dir(self) -> Path:
        if self.state_dir is None:
            raise CheckpointError(
                f"worker {self.name!r} keeps no checkpoints: it has no state directory (start it with "
                f"`splitnn worker --state-dir DIR`; in process, VirtualWorker(..., state_dir=DIR), which "
                f"fit(..., checkpoint_dir=DIR) gives the in-process workers that have none)"
            )
        return self.state_dir

    def _labelled(self, segments: Mapping[str, str]) -> dict[str, Hosted]:
        return {label: self._segment(key) for label, key in segments.items()}
