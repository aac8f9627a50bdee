"""A segment's state leaving or entering the party: weights and gradients to the researcher, weights to a
peer, weights loaded from a sender, and the weighted average of segments held here (FedAvg rounds).

Every read passes the release gate (:mod:`.gate`). State: none of its own (the hosted segments' modules).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from splitnn.accounting import RESEARCHER
from splitnn.errors import ConfigurationError, WorkerError
from splitnn.wire.tensor_codec import tensor_nbytes
from splitnn.workers.averaging import weighted_average
from splitnn.workers.checks import check_averaging, unreachable
from splitnn.workers.devices import RESEARCHER_DEVICE, state_to_cpu
from splitnn.workers.engine.hosted import Hosted, state_snapshot


class StateTransfer:
    """Weights and gradients in and out of the hosted segments, and their averaging."""

    def get_state(self, key: str, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Segment ``key``'s state dict (``trainable_only``: its trainable parameters only, e.g. LoRA adapters)."""
        hosted = self._released(key, "weights", f"segment {key!r}'s weights and buffers")
        module = hosted.module
        state = module.state_dict()
        if trainable_only:
            names = {n for n, p in module.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in names}
        state = state_to_cpu(state)
        self.ledger.record(self.name, RESEARCHER, "weights", state_nbytes(state))
        return state

    def get_grads(self, key: str) -> dict[str, torch.Tensor]:
        """Gradients of segment ``key``'s trainable parameters, by name (see :class:`GradientWorker`)."""
        hosted = self._released(key, "gradients", f"segment {key!r}'s gradients")
        grads = state_to_cpu(
            {
                n: (p.grad if p.grad is not None else torch.zeros_like(p))
                for n, p in hosted.module.named_parameters()
                if p.requires_grad
            }
        )
        self.ledger.record(self.name, RESEARCHER, "gradient", state_nbytes(grads))
        return grads

    def fetch_segment(self, key: str) -> nn.Module:
        hosted = self._released(key, "weights", f"segment {key!r}'s weights and buffers")
        module = copy.deepcopy(hosted.module).to(RESEARCHER_DEVICE)
        self.ledger.record(self.name, RESEARCHER, "weights", state_nbytes(module.state_dict()))
        return module

    def set_state(self, key: str, state: Mapping[str, torch.Tensor], *, src: str) -> None:
        hosted = self._segment(key)
        hosted.module.load_state_dict(dict(state))
        if hosted.released:  # the whole state is the sender's now: what a later read may hand out
            hosted.snapshot = state_snapshot(hosted.module)
        if src != self.name:
            self.ledger.record(src, self.name, "weights", state_nbytes(state))

    def send_state(self, key: str, dst: str, *, dst_key: str | None = None) -> None:
        """Hand segment ``key``'s weights straight to peer ``dst`` (recorded on the link self -> ``dst``)."""
        if dst != self.name:
            self.release_to_peer(key, dst)
        state = state_snapshot(self._segment(key).module)
        if dst == self.name:
            self.set_state(dst_key or key, state, src=self.name)
            return
        peer = self._peers.get(dst)
        if peer is None:
            raise unreachable(self.name, dst)
        if not isinstance(peer, StateTransfer):
            raise WorkerError(f"in-process worker {self.name!r} cannot send weights to non-local worker {dst!r}")
        peer.set_state(dst_key or key, state, src=self.name)

    def average_states(self, keys: Sequence[str], weights: Sequence[float], *, into: Sequence[str]) -> None:
        """Load the weighted average of segments ``keys`` into every segment of ``into`` (see
        :class:`AveragingWorker`); local, so nothing is recorded."""
        keys, weights, into = check_averaging(keys, weights, into, self.name)
        states = [self._segment(k).module.state_dict() for k in keys]  # an unknown key is named here
        targets = [self._segment(k) for k in into]
        for k in into:
            self._trainable(k)
        try:
            average = weighted_average(states, weights)
        except ConfigurationError as exc:
            raise ConfigurationError(f"worker {self.name!r}: cannot average segments {keys}: {exc}") from None
        for key, hosted in zip(into, targets):  # every target checked before any is written
            target = hosted.module.state_dict()
            wrong = [
                name
                for name in {*target, *average}
                if name not in target or name not in average or target[name].shape != average[name].shape
            ]
            if wrong:
                raise ConfigurationError(
                    f"worker {self.name!r}: segment {key!r} does not have the averaged segments' tensors "
                    f"(names or shapes differ: {sorted(wrong)[:5]}); average into copies of the same network"
                )
        for hosted in targets:
            hosted.module.load_state_dict(average)  # copies into the parameters: optimizers keep them

    def _released(self, key: str, what: str, gated: str) -> Hosted:
        """Segment ``key``, its ``what`` let out to the researcher by the gate (which freezes it, if gated)."""
        self._check_readable(what)
        hosted = self._segment(key)
        self._gate(key, hosted, gated, freeze=True)
        return hosted


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes a transfer of state dict ``state`` moves."""
    return sum(tensor_nbytes(t) for t in state.values())
