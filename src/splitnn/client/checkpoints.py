"""The researcher's side of a party's checkpoints: each party writes and loads its own."""

from __future__ import annotations

from collections.abc import Mapping

from splitnn.client.calls import serialized as _serialized


class Checkpoints:
    """Checkpoints at a worker (a component of :class:`~splitnn.client.RemoteWorker`)."""

    @_serialized
    def save_checkpoint(
        self, job: str, step: int, segments: Mapping[str, str], *, note: Mapping[str, object] | None = None
    ) -> dict:
        """Have the party write its checkpoint of ``segments`` (label -> key) locally; only its digest comes back."""
        return self._call("save_checkpoint", job=job, step=step, segments=dict(segments), note=dict(note or {}))

    @_serialized
    def load_checkpoint(self, job: str, step: int, segments: Mapping[str, str], *, digest: str | None = None) -> dict:
        """Have the party load its checkpoint of ``segments`` at ``step`` (refused when it does not match them,
        or -- given ``digest`` -- is not that file)."""
        info = self._call("load_checkpoint", job=job, step=step, segments=dict(segments), digest=digest)
        self._input_is_data.clear()
        self._merged.clear()
        self._feature_ids.clear()
        return info
