"""The researcher's side of a party's checkpoints: each party writes and loads its own."""

from __future__ import annotations

from collections.abc import Mapping

from splitnn.client.calls import serialized as _serialized
from splitnn.common import serde


class Checkpoints:
    """Checkpoints at a worker (a component of :class:`~splitnn.client.RemoteWorker`)."""

    @_serialized
    def save_checkpoint(
        self, job: str, step: int, segments: Mapping[str, str], *, note: Mapping[str, object] | None = None
    ) -> dict:
        """Have the party write its checkpoint of ``segments`` (label -> key) locally; only its digest comes back."""
        r, _ = self._request("save_checkpoint", serde.checkpoint_to_args(job, step, segments, note=note))
        return serde.party_checkpoint_from_result(r)

    @_serialized
    def load_checkpoint(self, job: str, step: int, segments: Mapping[str, str], *, digest: str | None = None) -> dict:
        """Have the party load its checkpoint of ``segments`` at ``step`` (refused when it does not match them,
        or -- given ``digest`` -- is not that file)."""
        r, _ = self._request("load_checkpoint", serde.checkpoint_to_args(job, step, segments, digest=digest))
        self._input_is_data.clear()
        self._merged.clear()
        self._feature_ids.clear()
        return serde.party_checkpoint_from_result(r)
