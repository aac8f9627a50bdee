"""What the many-holder topologies need a data holder's gate to open, and the refusal that says so.

Turn-taking (:class:`~splitnn.training.topologies.MultiHolderSplitNN`) hands the bottom segment's weights from
holder to holder (or through a weight store); SplitFed
(:class:`~splitnn.training.topologies.SplitFedSplitNN`) sends every holder's bottom to the aggregator each round
and the average back. A data holder's default policy (``release_weights = false``) refuses both: the weights were
trained on its data. A topology lists these transfers (:func:`check_weight_flows`); before training, every source
party is asked whether its gate lets them through (an in-process worker and a worker process alike), and a refusal,
then or at a transfer itself, is re-raised with the same explanation (:func:`explained`): the rule, the policy
lines that open it, and what they release.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from splitnn.errors import PolicyError, WorkerError
from splitnn.workers import PeerStateWorker, Worker


@dataclass(frozen=True)
class WeightFlow:
    """The bottom segment's weights leave ``src`` for ``dst`` during training, because ``why``."""

    src: Worker
    dst: Worker
    why: str


def opening(flows: Sequence[WeightFlow]) -> str:
    """What the source of ``flows`` (one party) must open, and what that releases (the end of a refusal)."""
    src, dsts = flows[0].src.name, sorted({f.dst.name for f in flows})
    return (
        f"{flows[0].why}: the operator of {src!r} opens this with `release_weights = true` in its policy (and, if "
        f"the policy has a `peers` rule, with {', '.join(map(repr, dsts))} listed in it), which lets the weights of "
        f"the segments trained on its data leave to the parties the model names -- never its rows; without it, "
        f"train with one data holder (a plain SplitNN chain), where no weights move"
    )


def check_weight_flows(flows: Sequence[WeightFlow]) -> None:
    """Refuse, before training, a flow whose source's gate would refuse it: every source party is asked
    (:meth:`~splitnn.workers.PeerStateWorker.may_release_weights`, which moves nothing), in process or across."""
    for flow in flows:
        if isinstance(flow.src, PeerStateWorker):  # (a worker without the capability answers at the transfer)
            with explained([flow]):
                flow.src.may_release_weights(flow.dst.name)


#: How a refusal of weights leaving to a peer reads (rules release_weights and peers; see splitnn.workers.policy)
_WEIGHTS_REFUSED = re.compile(
    r"worker '([^']*)' refuses (?:segment '[^']*''s weights to |the bottom segment's weights to "
    r"|its segments' weights to |to hand its weights to )'[^']*' \(policy rule (?:release_weights|peers)\)"
)


@contextmanager
def explained(flows: Sequence[WeightFlow]) -> Iterator[None]:
    """Re-raise a policy refusal of weights leaving a party of ``flows`` (rule ``release_weights`` or ``peers``)
    with what opens it, as a PolicyError. A worker process's refusal may surface at a later call, or at the peer
    that was to receive the weights (a WorkerError quoting it)."""
    try:
        yield
    except WorkerError as exc:
        text = str(exc)
        match = _WEIGHTS_REFUSED.search(text)
        mine = [f for f in flows if match is not None and f.src.name == match.group(1)]
        if not mine:
            raise
        raise PolicyError(f"{text}; {opening(mine)}") from None
