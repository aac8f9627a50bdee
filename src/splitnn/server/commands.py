"""The commands a researcher may run on a worker, each a checked call into the in-process engine.

Each researcher's session (:mod:`splitnn.server.sessions`) hosts its segments, optimizers
and datasets in a :class:`~splitnn.workers.VirtualWorker` of its own (the *engine*,
``fuse=False``), so a networked party runs exactly the kernels, in exactly the order, of an
in-process one. :class:`Commands` is one session's table of operations
(``_op_<name>(args, blobs) -> (result, blobs)``) that its executor
(:mod:`splitnn.server.executor`) looks commands up in. Each operation checks its
arguments (:func:`arg`, :func:`ref_arg`, :func:`blob_arg`: ``WireError`` on anything
malformed) and that the segment keys and dataset names it uses are not another session's
(``PolicyError``) before it touches the engine.

Tensors cross this layer by reference. An operation that produces a tensor publishes it
under the researcher's id (:class:`~splitnn.server.exports.Exports`); one that consumes
another party's tensor pulls it over the peer stream (:class:`~splitnn.server.peers.Peers`)
and puts it into the engine, which records the transfer on the receiving side, as in-process.

Topologies and baselines. ``forward_merged``/``backward_merged`` (vertical split learning)
pull every source activation like ``forward`` does and leave one gradient per source for its
owner to pull; ``export_state``/``load_state`` hand a segment's weights (safetensors) from one
worker to another over their peer stream as ``weights`` frames (the receiver pulls, loads and
records them); ``get_grads`` returns parameter gradients to the researcher (large-batch SGD).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parameter import is_lazy

from splitnn.common.messages import PROTOCOL_VERSION, check_party_name, check_session_tag
from splitnn.errors import ConfigurationError, SpecError, WireError, WorkerError
from splitnn.server.exports import StreamState
from splitnn.server.peers import PeerAddress
from splitnn.transport.limits import Limits
from splitnn.wire.optim_spec import OptimizerSpec
from splitnn.wire.spec import module_to_spec, spec_from_json, spec_to_json, spec_to_module
from splitnn.wire.state_codec import decode_state, encode_state
from splitnn.wire.tensor_codec import decode_tensor, encode_tensor
from splitnn.wire.trust import Trust
from splitnn.workers.losses import check_loss_name
from splitnn.workers.metrics import metrics_result, parse_metrics_args
from splitnn.workers.refs import BatchRef, TensorRef

if TYPE_CHECKING:
    from splitnn.server.sessions import Session, Sessions

#: Largest number of sources one ``forward_merged`` may merge.
MAX_MERGE_SOURCES = 256
#: Largest number of peers one session may name.
MAX_PEERS = 256

#: One operation: ``(args, blobs, *, caller, state) -> (result, blobs)``.
Op = Callable[..., Awaitable[tuple[dict, list[bytes]]]]


# ---------------------------------------------------------------------------- arguments
def arg(args: dict, key: str, kind: type | tuple, *, optional: bool = False) -> Any:
    """Command argument ``key`` of type ``kind`` (strings <= 256 chars, ints 0..2**63-1); WireError otherwise."""
    if key not in args or args[key] is None:
        if optional:
            return None
        raise WireError(f"command argument {key!r} is missing")
    value = args[key]
    if isinstance(value, bool) and kind is not bool and not (isinstance(kind, tuple) and bool in kind):
        raise WireError(f"command argument {key!r} must be {kind}, got a boolean")
    if not isinstance(value, kind):
        raise WireError(f"command argument {key!r} has the wrong type {type(value).__name__}")
    if isinstance(value, str) and len(value) > 256:
        raise WireError(f"command argument {key!r} is too long")
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value < 2**63:
        raise WireError(f"command argument {key!r} is out of range")
    return value


def ref_arg(value: object) -> TensorRef:
    """A tensor ref ``{owner, id}`` given as an argument."""
    if not isinstance(value, dict):
        raise WireError("a tensor ref must be an object {owner, id}")
    return TensorRef(check_party_name(arg(value, "owner", str)), arg(value, "id", int))


def blob_arg(blobs: list[bytes], i: int, what: str) -> bytes:
    """Blob ``i`` of a command (``what`` names it in the error when it is missing)."""
    if i >= len(blobs):
        raise WireError(f"command is missing its {what} blob")
    return blobs[i]


def check_state_fits_spec(spec: Any, state: dict[str, torch.Tensor], key: str, trust: Trust | None = None) -> None:
    """Refuse weights whose names or shapes do not fit ``spec``'s parameters and buffers, before building it.

    The spec is built on the ``meta`` device, which allocates nothing; a spec with layers that
    cannot be built there (or lazy ones) is checked after the real build, by ``load_state_dict``.
    """
    try:
        with torch.device("meta"):
            meta = spec_to_module(spec, trust=trust)
        tensors = list(meta.parameters()) + list(meta.buffers())
        if any(is_lazy(t) for t in tensors):
            return
        expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    except SpecError:
        raise
    except Exception:  # a custom layer that cannot be built on the meta device
        return
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [
        f"{k}: {tuple(state[k].shape)} for {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    problems = [
        f"{what} {items[:5]}{' ...' if len(items) > 5 else ''}"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if items
    ]
    if problems:
        raise WireError(f"weights for segment {key!r} do not fit its spec: {'; '.join(problems)}")


def _id_list(ids: object) -> list[int]:
    if (
        not isinstance(ids, list)
        or not 0 < len(ids) <= MAX_MERGE_SOURCES
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**63 for i in ids)
    ):
        raise WireError(f"backward_merged needs 1..{MAX_MERGE_SOURCES} tensor ids")
    return ids


class Commands:
    """The operations of one session at one worker, by name (:attr:`table`); see the module docstring."""

    def __init__(
        self, name: str, session: Session, *, sessions: Sessions, limits: Limits, trust: Trust | None = None
    ) -> None:
        self.name, self.session, self.sessions = name, session, sessions
        self.engine, self.exports, self.peers = session.engine, session.exports, session.peers
        self.limits, self.counters = limits, session.counters
        self.trust = trust or Trust()  # what add_segment may import (splitnn worker --trust)
        self.table: dict[str, Op] = {attr[4:]: getattr(self, attr) for attr in dir(self) if attr.startswith("_op_")}

    # -- helpers -------------------------------------------------------------------------------
    def _key(self, args: dict, name: str = "key") -> str:
        """Segment key argument ``name``: PolicyError if another session hosts that segment."""
        return self.sessions.check_segment(self.session, arg(args, name, str))

    def _dataset(self, name: str) -> str:
        """A dataset name this session may read: PolicyError if another session placed it."""
        return self.sessions.check_dataset(self.session, name)

    def check_plan_names(self, args: dict) -> None:
        """The segment keys and dataset a shipped epoch's plan names are not another session's."""
        stages = args.get("stages")
        for st in stages if isinstance(stages, list) else ():
            if isinstance(st, dict) and isinstance(st.get("key"), str):
                self.sessions.check_segment(self.session, st["key"])
        if isinstance(args.get("dataset"), str):
            self._dataset(args["dataset"])

    async def _resolve(self, value: object, kind: str) -> TensorRef:
        """An engine ref for a researcher ref: local, or pulled from its owner over the peer link."""
        ref = ref_arg(value)
        if ref.owner == self.name:
            return self.exports.local(ref)
        tensor = await self.peers.pull(ref.owner, ref.id, kind)
        return self.engine.put(tensor, src=ref.owner, kind=kind)  # the receiver records the transfer

    async def _grad(self, args: dict) -> TensorRef | None:
        grad = args.get("grad")
        return await self._resolve(grad, "gradient") if grad is not None else None

    def _batch(self, args: dict, blobs: list[bytes]) -> BatchRef:
        name = self._dataset(arg(args, "dataset", str))
        idx = decode_tensor(
            blob_arg(blobs, 0, "indices"),
            max_bytes=self.limits.max_blob_bytes,
            allowed_dtypes=(torch.int64,),
            max_ndim=1,
        )
        if idx.dim() != 1:
            raise WireError("batch indices must be a 1-D int64 tensor")
        size = self.engine.dataset_stats(name).size
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise WireError(f"batch indices of dataset {name!r} out of range 0..{size - 1}")
        return BatchRef(name, idx)

    # -- set-up ----------------------------------------------------------------------------------
    async def _op_hello(self, a, blobs, **_):
        # the party's own datasets only: what other sessions placed is theirs to know
        return {
            "name": self.name,
            "protocol": PROTOCOL_VERSION,
            "datasets": self.sessions.party_datasets(),
            "device": str(self.engine.device),
        }, []

    async def _op_stats(self, a, blobs, **_):
        return {"counters": self.counters.to_rows(), "ledger": self.engine.ledger.to_rows()}, []

    async def _op_peers(self, a, blobs, **_):
        """The peers of this session's model: ``{name: {"address": HOST:PORT, "session": TAG}}``.

        ``session`` is the tag of the researcher's session at that peer (default: this session's
        own, i.e. the same session id there); a plain ``HOST:PORT`` string means the same.
        """
        peers = arg(a, "peers", dict)
        if len(peers) > MAX_PEERS:
            raise WireError(f"a session may name at most {MAX_PEERS} peers, got {len(peers)}")
        found: dict[str, PeerAddress] = {}
        for peer, where in peers.items():
            check_party_name(peer)
            if isinstance(where, dict) and set(where) <= {"address", "session"}:
                address, tag = where.get("address"), where.get("session", self.session.tag)
            else:
                address, tag = where, self.session.tag
            if not isinstance(address, str) or ":" not in address or len(address) > 256:
                raise WireError(f"peer {peer!r} has a malformed address {address!r}")
            if peer != self.name:
                found[peer] = PeerAddress(address, check_session_tag(tag))
        self.peers.addresses.update(found)
        return {}, []

    async def _op_stage(self, a, blobs, *, state: StreamState, **_):
        state.stage(arg(a, "sid", int), blob_arg(blobs, 0, "chunk"), self.limits.max_blob_bytes)
        return {}, []

    async def _op_add_segment(self, a, blobs, **_):
        key = arg(a, "key", str)  # another session's segment of that name is its own: not touched
        replace = arg(a, "replace", bool, optional=True) or False
        if key in self.engine._segments and not replace:  # refused before anything is decoded or built
            raise ConfigurationError(
                f"worker {self.name!r} already hosts a segment {key!r} in this session; use another key, or "
                f"pass replace=True to replace it"
            )
        opt = arg(a, "optimizer", dict, optional=True)
        optimizer = OptimizerSpec.from_dict(opt) if opt is not None else None  # SpecError on insane values
        spec = spec_from_json(blob_arg(blobs, 0, "spec"))
        state = decode_state(blob_arg(blobs, 1, "state"), max_bytes=self.limits.max_blob_bytes)
        check_state_fits_spec(spec, state, key, self.trust)  # before allocating the model
        module = spec_to_module(spec, trust=self.trust)
        try:
            module.load_state_dict(state)
        except (RuntimeError, KeyError) as exc:
            raise WireError(f"weights for segment {key!r} do not fit its spec: {exc}") from None
        self.engine.add_segment(key, module, optimizer, replace=replace)
        self.sessions.claim_segment(self.session, key)
        return {}, []

    async def _op_remove_segment(self, a, blobs, **_):
        key = self._key(a)
        self.engine.remove_segment(key)
        self.sessions.release_segment(self.session, key)
        return {}, []

    async def _op_add_dataset(self, a, blobs, **_):
        name = self.sessions.check_placing(arg(a, "name", str))
        replace = arg(a, "replace", bool, optional=True) or False
        parts = arg(a, "parts", list)
        if not parts or any(p not in ("features", "labels") for p in parts) or len(parts) != len(set(parts)):
            raise WireError("'parts' must list 'features' and/or 'labels'")
        tensors = {
            p: decode_tensor(blob_arg(blobs, i, p), max_bytes=self.limits.max_blob_bytes) for i, p in enumerate(parts)
        }
        self.engine.add_dataset(name, **tensors, replace=replace)
        self.sessions.claim_dataset(self.session, name)
        return {}, []

    async def _op_dataset_stats(self, a, blobs, **_):
        return self.engine.dataset_stats(self._dataset(arg(a, "name", str))).to_dict(), []

    async def _op_probe(self, a, blobs, **_):
        shape = arg(a, "shape", list)
        if (
            not 0 < len(shape) <= 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 20 for d in shape)
            or math.prod(shape) > 1 << 26
        ):
            raise WireError(f"probe shape {shape!r} is not a small positive shape")
        return {"shape": list(self.engine.probe(self._key(a), tuple(shape)))}, []

    # -- the training step --------------------------------------------------------------------
    async def _op_put(self, a, blobs, *, caller: str, state: StreamState, **_):
        tid, kind = arg(a, "id", int), arg(a, "kind", str)
        self.exports.announce(state, tid)
        if kind not in ("features",):
            raise WireError(f"the researcher may only put 'features', not {kind!r}")
        with self.exports.producing(state, tid):
            tensor = decode_tensor(blob_arg(blobs, 0, "tensor"), max_bytes=self.limits.max_tensor_bytes)
            self.exports.export(tid, self.engine.put(tensor, src=caller, kind=kind))
        return {}, []

    async def _op_forward(self, a, blobs, *, state: StreamState, **_):
        tid = arg(a, "id", int)
        with self.exports.producing(state, tid):
            key, train = self._key(a), arg(a, "train", bool)
            src = arg(a, "src", dict)
            source = self._batch(src, blobs) if "dataset" in src else await self._resolve(src, "activation")
            self.exports.export(tid, self.engine.forward(key, source, train=train))
        return {}, []

    async def _op_loss(self, a, blobs, **_):
        output = await self._resolve(arg(a, "output", dict), "activation")
        loss = check_loss_name(arg(a, "loss", str))
        keep = arg(a, "keep", str, optional=True)  # an evaluation whose outputs are kept for its metrics
        stats = self.engine.loss(output, self._batch(a, blobs), loss, train=arg(a, "train", bool), keep=keep)
        return {"loss": stats.loss, "correct": stats.correct, "count": stats.count}, []

    async def _op_metrics(self, a, blobs, **_):
        """Metrics over the outputs kept by ``loss(..., keep=ID)``: only the values leave this party."""
        keep, names = parse_metrics_args(a)
        return metrics_result(self.engine.metrics(keep, names)), []

    async def _op_backward(self, a, blobs, *, state: StreamState, **_):
        tid = arg(a, "id", int, optional=True)
        with self.exports.producing(state, tid):
            key = self._key(a)
            self.exports.export(tid, self.engine.backward(key, await self._grad(a)))
        return {}, []

    async def _op_forward_merged(self, a, blobs, *, state: StreamState, **_):
        """Pull every source activation from its owner (in parallel), merge, run the segment."""
        tid = arg(a, "id", int)
        with self.exports.producing(state, tid):
            key, train, merge = self._key(a), arg(a, "train", bool), arg(a, "merge", str)
            srcs = arg(a, "srcs", list)
            if not 0 < len(srcs) <= MAX_MERGE_SOURCES:
                raise WireError(f"forward_merged takes 1..{MAX_MERGE_SOURCES} sources, got {len(srcs)}")
            refs = await asyncio.gather(*(self._resolve(src, "activation") for src in srcs))
            self.exports.export(tid, self.engine.forward_merged(key, list(refs), merge, train=train))
        return {}, []

    async def _op_backward_merged(self, a, blobs, *, state: StreamState, **_):
        """Back-propagate through the segment and its merge; export one gradient per source."""
        ids = _id_list(arg(a, "ids", list))
        with self.exports.producing(state, *ids):
            key = self._key(a)
            refs = self.engine.backward_merged(key, await self._grad(a))
            if len(refs) != len(ids):
                raise WorkerError(
                    f"worker {self.name!r}: segment {key!r} merged {len(refs)} sources, but "
                    f"{len(ids)} gradient ids were given"
                )
            for tid, ref in zip(ids, refs):
                self.exports.export(tid, ref)
        return {}, []

    async def _op_zero_grad(self, a, blobs, **_):
        self.engine.zero_grad(self._key(a))
        return {}, []

    async def _op_step(self, a, blobs, **_):
        self.engine.step(self._key(a))
        return {}, []

    async def _op_get_grads(self, a, blobs, **_):
        grads = self.engine.get_grads(self._key(a))
        return {}, [encode_state(grads)]

    async def _op_run_epoch(self, a, blobs, **_):
        raise WireError("run_epoch runs only as a command of its own on a Session stream")

    async def _op_release(self, a, blobs, **_):
        self.engine.release()  # this session's intermediate tensors only
        self.exports.cancel_all()
        return {}, []

    async def _op_end_session(self, a, blobs, **_):
        """The researcher is done: free everything this session holds now (no grace period, no resume)."""
        self.sessions.end(self.session)
        return {}, []

    # -- weights and outputs ------------------------------------------------------------------
    async def _op_export_state(self, a, blobs, *, state: StreamState, **_):
        """Snapshot segment ``key``'s weights (safetensors) as tensor ``id``, for one peer to pull.

        Nothing is recorded here: the receiver records the transfer (``load_state``).
        """
        tid = arg(a, "id", int)
        with self.exports.producing(state, tid):
            module = self.engine._segment(self._key(a)).module
            blob = encode_state({k: v.detach() for k, v in module.state_dict().items()})
            payload = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            self.exports.export(tid, self.engine._keep(payload, "weights"))
        return {}, []

    async def _op_load_state(self, a, blobs, **_):
        """Load weights another party exported (``export_state``) into segment ``key``, pulling them over
        the peer stream; recorded as ``weights`` bytes on the link owner -> this worker."""
        key = self._key(a)
        src = ref_arg(arg(a, "src", dict))
        if src.owner == self.name:
            payload = self.engine._take(self.exports.local(src).id)
        else:
            payload = await self.peers.pull(src.owner, src.id, "weights")
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise WireError(f"worker {self.name!r}: weights from {src.owner!r} must be a 1-D uint8 payload")
        state = decode_state(payload.numpy().tobytes(), max_bytes=self.limits.max_blob_bytes)
        try:
            self.engine.set_state(key, state, src=src.owner)  # records owner -> self (not when local)
        except RuntimeError as exc:  # load_state_dict: names or shapes do not fit the segment
            raise WireError(
                f"worker {self.name!r}: weights from {src.owner!r} do not fit segment {key!r}: {exc}"
            ) from None
        return {}, []

    async def _op_fetch(self, a, blobs, **_):
        ref = ref_arg(arg(a, "ref", dict))
        if ref.owner != self.name:
            raise WorkerError(f"worker {self.name!r} holds no tensor of {ref.owner!r}")
        tensor = self.engine.fetch(self.exports.produced(ref.id), kind=arg(a, "kind", str))  # policy check
        self.exports.forget(ref.id)
        return {}, [encode_tensor(tensor)]

    async def _op_get_state(self, a, blobs, **_):
        state = self.engine.get_state(self._key(a))
        return {}, [encode_state(state)]

    async def _op_set_state(self, a, blobs, *, caller: str, **_):
        state = decode_state(blob_arg(blobs, 0, "state"), max_bytes=self.limits.max_blob_bytes)
        self.engine.set_state(self._key(a), state, src=caller)
        return {}, []

    async def _op_fetch_segment(self, a, blobs, **_):
        module = self.engine.fetch_segment(self._key(a))
        return {}, [spec_to_json(module_to_spec(module)).encode(), encode_state(module.state_dict())]
