"""The policy's release gate, the hijack guard and the audit of refusals (:mod:`splitnn.workers.policy`).

State: ``policy``; ``audit`` and ``audit_session`` (where refusals are written); ``neighbours`` (the
parties adjacent in the model, who may pull this party's tensors); ``_hijack_guards`` (rule ``detect_hijack``,
per data-reading segment).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitnn.errors import PolicyError
from splitnn.workers.audit import AuditLog
from splitnn.workers.engine.hosted import Hosted, state_snapshot
from splitnn.workers.guard import HijackGuard
from splitnn.workers.policy import WorkerPolicy, check_grad_norms, check_hijack, check_peer, check_release


class Gate:
    """What a party lets out, and when it refuses to train: the engine's policy checks."""

    def _init_gate(self, policy: WorkerPolicy | None, audit: AuditLog | None) -> None:
        self.policy = policy or WorkerPolicy()
        self.audit = audit
        self.audit_session: str | None = None  # the session tag a networked worker writes on audit lines
        # Parties adjacent to this one in the model (None: not declared): peers' pulls are refused
        # from anyone else unless the policy names its peers.
        self.neighbours: frozenset[str] | None = None
        self._hijack_guards: dict[str, HijackGuard] = {}  # policy rule detect_hijack, per data-reading segment

    def declare_neighbours(self, names: Sequence[str]) -> None:
        """The parties adjacent to this one in a model (they exchange activations, gradients or weights
        with it): without a ``peers`` rule in the policy, only they may pull this party's tensors.
        A model declares them when it places its segments; declarations of several models add up."""
        self.neighbours = frozenset(self.neighbours or ()) | {n for n in names if n != self.name}

    def check_receiver(self, peer: str, what: str) -> None:
        """Refuse (PolicyError, audited) handing ``what`` to ``peer`` unless the policy's ``peers`` rule,
        or without one the model's declared adjacency (:meth:`declare_neighbours`), allows it."""
        self._guard(check_peer, self.policy, self.name, peer, self.neighbours, what)

    def release_to_peer(self, key: str, peer: str | None) -> None:
        """The gate for segment ``key``'s weights leaving to peer ``peer`` (``send_state``; a server's
        ``export_state``, whose puller is checked when it pulls: ``None``): ``release_weights``, then under a
        gated policy the ``peers`` rule (or the model's adjacency). Weights sent to a peer do not freeze the
        segment (aggregation rounds send them each round): ``release_weights`` trusts the peers with them."""
        self._gate(key, self._segment(key), f"segment {key!r}'s weights to {peer or 'a peer'!r}")
        if peer is not None and peer != self.name and self.policy.gated:
            self.check_receiver(peer, "its weights")

    def may_release_weights(self, peer: str) -> None:
        """Refuse (PolicyError, audited) what :meth:`release_to_peer` would refuse for this party's segments'
        weights leaving to ``peer`` -- ``release_weights``, then under a gated policy the ``peers`` rule (or the
        model's adjacency) -- moving nothing and freezing nothing: a topology asks before training."""
        self._guard(check_release, self.policy, self.name, f"its segments' weights to {peer!r}")
        if peer != self.name and self.policy.gated:
            self.check_receiver(peer, "its weights")

    def release_grad_norms(self, key: str) -> None:
        """The gate for the norms of segment ``key``'s gradients leaving to the researcher
        (``release_grad_norms``); they do not freeze the segment: clipping asks for them every batch."""
        self._guard(check_grad_norms, self.policy, self.name, key)

    def _gate(self, key: str, hosted: Hosted, what: str, *, freeze: bool = False) -> None:
        """The one gate for state derived from this party's data (weights, buffers, gradients, probes of
        trained state): refused unless the policy's ``release_weights`` allows it; under a gated policy,
        a segment released to the researcher is frozen from then on ("the end")."""
        self._guard(check_release, self.policy, self.name, what)
        if freeze and self.policy.gated:
            if hosted.released:  # an evaluation may have written a buffer since (a graph with out=): not again
                now = hosted.module.state_dict()
                if hosted.snapshot is None or any(not torch.equal(now[k], v) for k, v in hosted.snapshot.items()):
                    self._guard(_refuse_changed, self.name, key)
            else:
                hosted.released, hosted.snapshot = True, state_snapshot(hosted.module)

    def _trainable(self, key: str, train: bool = True) -> Hosted:
        """Segment ``key``, refused (policy rule ``release_weights``) for training once its weights were released."""
        hosted = self._segment(key)
        if hosted.released and train:
            self._frozen(key)
        return hosted

    def _frozen(self, key: str) -> None:
        self._guard(_refuse_frozen, self.name, key)

    def _guard(self, check, *args, **kwargs) -> None:
        """Run a policy check; record a refusal in the audit log before raising it."""
        try:
            check(*args, **kwargs)
        except PolicyError as exc:
            if self.audit is not None:
                rule = str(exc).partition("(policy rule ")[2].partition(")")[0] or "release_outputs"
                self.audit.write("refusal", session=self.audit_session, rule=rule, message=str(exc))
            raise

    def _hijack_guard(self, key: str) -> HijackGuard:
        """The hijack detector of data-reading segment ``key`` (policy rule ``detect_hijack``)."""
        guard = self._hijack_guards.get(key)
        if guard is None:
            guard = self._hijack_guards[key] = HijackGuard(threshold=self.policy.detect_hijack)
        return guard

    def _check_hijack(self, key: str) -> None:
        """Refuse gradients for ``key`` once its hijack detector has tripped (recorded once in the audit log)."""
        guard = self._hijack_guards.get(key)
        if guard is not None and guard.tripped:
            self._guard(check_hijack, self.name, key, guard.reason)


def _refuse_changed(worker: str, key: str) -> None:
    raise PolicyError(
        f"worker {worker!r} refuses segment {key!r}'s state (policy rule release_weights): it was released, and "
        f"its state has changed since (a forward wrote into it); only the released state may leave"
    )


def _refuse_frozen(worker: str, key: str) -> None:
    raise PolicyError(
        f"worker {worker!r} refuses to train segment {key!r} further (policy rule release_weights): its weights "
        f"were released, which is the end of its training here (a released segment is frozen); install a new "
        f"segment to train again"
    )
