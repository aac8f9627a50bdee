"""Every remote operation's arguments and results, each message's two directions side by side.

The researcher's client (:mod:`splitnn.client`) encodes what a worker's server
(:mod:`splitnn.server`) decodes, and the other way round; both import this module, so the
two ends cannot drift apart (Flower's ``common/serde.py`` is the model: matching
``*_to_*`` / ``*_from_*`` pairs). Decoders check everything a peer could get wrong and raise
:class:`~splitnn.errors.WireError`. Nothing here imports grpc.
"""

from __future__ import annotations

from splitnn.errors import WireError
from splitnn.workers.refs import LossStats


def losses_to_result(losses: list[LossStats]) -> dict:
    """Losses as JSON lists (Python floats round-trip exactly through JSON)."""
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
