"""The researcher's side of a party's segments: hosting, replacing, codecs, weights, peers and neighbours."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from splitnn.accounting import RESEARCHER
from splitnn.client.calls import Calls
from splitnn.client.calls import encode_args as _args
from splitnn.client.calls import serialized as _serialized
from splitnn.common import serde
from splitnn.common.operations import OPERATIONS
from splitnn.errors import ConfigurationError, WorkerError
from splitnn.wire.compress import get_codec
from splitnn.wire.optim_spec import OptimizerSpec
from splitnn.wire.spec import module_to_spec, spec_to_module
from splitnn.wire.trust import Trust, imported_modules
from splitnn.workers.base import OptimizerLike, Worker
from splitnn.workers.checks import (
    check_segment,
)


class Segments:
    """Segments at a worker (a component of :class:`~splitnn.client.RemoteWorker`)."""

    @_serialized
    def connect_peers(self, peers: Mapping[str, Worker]) -> None:
        self._peers.update({n: w for n, w in peers.items() if n != self.name})
        addresses = self._peer_addresses(peers)
        others = [n for n, w in peers.items() if not isinstance(w, Calls) and n != self.name]
        if others:
            raise ConfigurationError(
                f"remote worker {self.name!r} cannot exchange tensors with in-process "
                f"worker(s) {others}; make every worker of a model remote (splitnn.connect)"
            )
        args = serde.peers_to_args(addresses)
        self._request("peers", args)
        self._installed.pop(("peers", ""), None)
        self._installed[("peers", "")] = (args, [])

    def _peer_addresses(self, peers: Mapping[str, Worker]) -> dict[str, serde.PeerAddress]:
        # each peer's address and the tag of our session there: the worker pulls from (and pushes to)
        # that session only, and the peer hands its tensors only to the parties our session names
        return {
            n: serde.PeerAddress(w.address, w.session_tag, w.data_address)
            for n, w in peers.items()
            if isinstance(w, Calls) and n != self.name
        }

    @_serialized
    def add_segment(
        self, key: str, segment: nn.Module, optimizer: OptimizerLike | None, *, replace: bool = False
    ) -> None:
        check_segment(segment, key, self.name)
        if optimizer is not None and callable(optimizer) and not isinstance(optimizer, (str, OptimizerSpec)):
            raise ConfigurationError(
                f"remote worker {self.name!r} cannot take an optimizer factory (code does not cross the wire); "
                f"give a spec such as optimizer='sgd:lr=0.03' or splitnn.wire.OptimizerSpec('adam', lr=1e-3)"
            )
        opt = OptimizerSpec.coerce(optimizer) if optimizer is not None else None
        described = module_to_spec(segment)
        state = segment.state_dict()
        frozen = [n for n, p in segment.named_parameters() if not p.requires_grad]
        args, blobs = _args(
            "add_segment",
            key=key,
            optimizer=opt,
            replace=replace,
            frozen=frozen,
            spec=described,
            state=state,
            autocast=self._autocast,  # the worker runs this segment under it (a replay sends it again)
        )
        self._request("add_segment", args, blobs)
        self._imports |= imported_modules(described)
        self._installed.pop(("add_segment", key), None)
        self._installed[("add_segment", key)] = ({**args, "replace": True}, blobs)

    @_serialized
    def remove_segment(self, key: str) -> None:
        self._call("remove_segment", key=key)
        self._installed.pop(("add_segment", key), None)
        self._installed.pop(("set_codecs", key), None)

    @_serialized
    def set_codecs(self, key: str, *, output: str | None = None, input_grad: str | None = None) -> None:
        """Compress what segment ``key`` sends to the other parties (:class:`~splitnn.workers.CodecWorker`): the
        worker encodes its output activations with ``output`` and its input's gradient with ``input_grad``;
        the encoders' state (error feedback) lives there, at the sender."""
        output, input_grad = (get_codec(c).spec for c in (output, input_grad))  # ConfigurationError before sending
        args, _ = OPERATIONS["set_codecs"].encode_args(key=key, output=output, input_grad=input_grad)
        self._request("set_codecs", args)
        self._installed[("set_codecs", key)] = (args, [])  # a restarted worker gets its codecs again

    @_serialized
    def set_state(self, key: str, state: Mapping[str, torch.Tensor], *, src: str) -> None:
        if src != RESEARCHER:
            raise WorkerError(f"remote worker {self.name!r} only accepts weights sent by the researcher")
        self._call("set_state", key=key, state=state)

    @_serialized
    def fetch_segment(self, key: str) -> nn.Module:
        got = self._call("fetch_segment", key=key)
        spec, state = got["spec"], got["state"]
        # imports only from the modules of classes we sent ourselves
        module = spec_to_module(spec, trust=Trust(sorted(self._imports)))
        module.load_state_dict(state)
        return module

    @_serialized
    def declare_neighbours(self, names: Sequence[str]) -> None:
        """Tell the worker which parties are adjacent to it in the model: without a ``peers`` rule in its
        policy, only they may pull this session's tensors there."""
        args, _ = OPERATIONS["neighbours"].encode_args(names=list(names))
        self._request("neighbours", args)
        self._installed.pop(("neighbours", ""), None)
        self._installed[("neighbours", "")] = (args, [])
