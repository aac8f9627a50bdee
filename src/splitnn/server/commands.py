"""The commands a researcher may run on a worker, each a checked call into the in-process engine.

:class:`Commands` is one session's table of operations, which its executor (:mod:`splitnn.server.executor`)
looks commands up in; its docstring says how each is checked and run, how tensors cross by reference,
and what the PSI, topology and baseline operations do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parameter import is_lazy

from splitnn.common import serde
from splitnn.common.operation import Operation
from splitnn.common.operations import OPERATIONS
from splitnn.errors import ConfigurationError, MemoryBudgetError, SpecError, WireError, WorkerError
from splitnn.server.exports import StreamState
from splitnn.transport.limits import Limits
from splitnn.wire.budget import DEFAULT_MAX_SESSION_MEMORY, guard_segment
from splitnn.wire.spec import module_to_spec, spec_to_module
from splitnn.wire.trust import Trust
from splitnn.workers.losses import check_loss_name
from splitnn.workers.refs import BatchRef, TensorRef

if TYPE_CHECKING:
    from splitnn.server.sessions import Session, Sessions

#: Largest number of sources one ``forward_merged`` may merge.
MAX_MERGE_SOURCES = serde.MAX_MERGE_SOURCES

#: One operation: ``(args, blobs, *, caller, state) -> (result, blobs)``.
Op = Callable[..., Awaitable[tuple[dict, list[bytes]]]]


# ---------------------------------------------------------------------------- weights
def check_state_fits_spec(
    spec: Any, state: dict[str, torch.Tensor], key: str, trust: Trust | None = None
) -> torch.nn.Module | None:
    """Refuse weights whose names or shapes do not fit ``spec``'s parameters and buffers, before building it.

    The spec is built on the ``meta`` device, which allocates nothing; a spec with layers that
    cannot be built there (or lazy ones) is checked after the real build, by ``load_state_dict``.
    Returns that meta build (None if it could not be made).
    """
    try:
        with torch.device("meta"):
            meta = spec_to_module(spec, trust=trust)
        tensors = list(meta.parameters()) + list(meta.buffers())
        if any(is_lazy(t) for t in tensors):
            return meta
        expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    except SpecError:
        raise
    except Exception:  # a custom layer that cannot be built on the meta device
        return None
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
    return meta


class _PeerCommands:
    """The operations of :class:`Commands` that exchange tensors with peers beyond one step: PSI messages,
    weights hand-off and checkpoints (a part of :class:`Commands`)."""

    async def _psi_message(self, ref: TensorRef) -> TensorRef:
        """An engine ref to the PSI message ``ref``: this session's own, or pulled from its sender as ``psi``."""
        if ref.owner == self.name:
            local = self.exports.local(ref)
            if self.engine.stored_kind(local.id) != "psi":
                raise WorkerError(f"worker {self.name!r}: tensor #{ref.id} is not a PSI message")
            return local
        return await self._resolve(ref, "psi")  # the peer hands out only a "psi" tensor to this pull

    async def _serve_psi_request(self, a: dict, **_: Any) -> None:
        # the elliptic-curve work takes seconds for large tables: off the event loop, so that the other
        # sessions' commands and the keepalives go on meanwhile (this session waits for it anyway)
        ref = await asyncio.to_thread(self.engine.psi_request, a["session"], a["dataset"])
        self.exports.export(a["id"], ref)

    async def _serve_psi_reply(self, a: dict, **_: Any) -> None:
        dataset, request = a["dataset"], a["src"]
        # a missing dataset, or one the policy keeps out of PSI or from this peer, is refused before the pull
        self.engine.psi_admit(dataset, peer=request.owner)
        message = await self._psi_message(request)
        self.exports.export(a["id"], await asyncio.to_thread(self.engine.psi_reply, dataset, message))

    async def _serve_psi_finish(self, a: dict, **_: Any) -> None:
        reply = a["src"]
        self.engine.check_psi_peer(reply.owner)  # (before the reply is pulled)
        message = await self._psi_message(reply)
        await asyncio.to_thread(self.engine.psi_finish, a["session"], message)

    async def _serve_psi_apply(self, a: dict, **_: Any) -> None:
        parts = a["parts"]
        for name in parts:
            self.sessions.check_placing(name)  # a part never takes the name of one of the party's own datasets
        # The aligned rows replace the dataset (and any earlier part of the same name) in this session's
        # engine only: another session, or one holding a part of the same name, keeps its own.
        self.engine.psi_apply(a["dataset"], parts)
        for name in parts:
            self.sessions.claim_dataset(self.session, name)

    # -- weights ------------------------------------------------------------------------------
    async def _serve_export_state(self, a: dict, **_: Any) -> None:
        """Snapshot segment ``key``'s weights (safetensors) as tensor ``id``, for one peer to pull.

        Nothing is recorded here: the receiver records the transfer (``load_state``).
        """
        key = a["key"]
        self.engine.release_to_peer(key, None)  # the party's gate (release_weights); the pull checks the peer
        module = self.engine.segment(key)
        blob = serde.state_to_blob({k: v.detach() for k, v in module.state_dict().items()})
        payload = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        self.exports.export(a["id"], self.engine.keep(payload, "weights"))

    async def _serve_load_state(self, a: dict, **_: Any) -> None:
        """Load weights another party exported (``export_state``) into segment ``key``, pulling them over
        the peer stream; recorded as ``weights`` bytes on the link owner -> this worker."""
        key, src = a["key"], a["src"]
        if src.owner == self.name:
            payload = self.engine.take(self.exports.local(src).id)
        else:
            payload = (await self.peers.pull(src.owner, src.id, "weights")).value
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise WireError(f"worker {self.name!r}: weights from {src.owner!r} must be a 1-D uint8 payload")
        state = serde.state_from_blob(payload.numpy().tobytes(), max_bytes=self.limits.max_blob_bytes)
        try:
            self.engine.set_state(key, state, src=src.owner)  # records owner -> self (not when local)
        except RuntimeError as exc:  # load_state_dict: names or shapes do not fit the segment
            raise WireError(
                f"worker {self.name!r}: weights from {src.owner!r} do not fit segment {key!r}: {exc}"
            ) from None

    # -- checkpoints (each party writes its own, into its --state-dir) -------------------------
    async def _serve_save_checkpoint(self, a: dict, **_: Any) -> dict:
        """Write this party's checkpoint of the named segments locally (nothing travels but the digest).
        Disk I/O runs on a thread: the worker's other sessions go on meanwhile (this one's next command waits)."""
        segments = {label: self._key(key) for label, key in a["segments"].items()}
        info = await asyncio.to_thread(self.engine.save_checkpoint, a["job"], a["step"], segments, note=a["note"])
        self.session.audit_sent()
        return info

    async def _serve_load_checkpoint(self, a: dict, **_: Any) -> dict:
        """Load this party's checkpoint into the named segments (refused, before anything changes, when it
        does not match them or is not the file the researcher's manifest records)."""
        segments = {label: self._key(key) for label, key in a["segments"].items()}
        self.exports.cancel_all()
        return await asyncio.to_thread(self.engine.load_checkpoint, a["job"], a["step"], segments, digest=a["digest"])


class Commands(_PeerCommands):
    """The operations of one session at one worker, by name (:attr:`table`).

    Each researcher's session (:mod:`splitnn.server.sessions`) hosts its segments, optimizers
    and datasets in a :class:`~splitnn.workers.VirtualWorker` of its own (the *engine*,
    ``fuse=False``), so a networked party runs exactly the kernels, in exactly the order, of an
    in-process one. :class:`Commands` is one session's table of operations that its executor
    (:mod:`splitnn.server.executor`) looks commands up in. An operation declared in
    :mod:`splitnn.common.operations` is decoded and checked field by field (``WireError`` naming the
    field), its segment keys, dataset names and batches are checked to be this session's (``PolicyError``),
    then the engine method it names runs, or its ``_serve_<name>`` handler when it needs work of its own
    here. The few commands with framing of their own (``hello``, ``health``, ``stats``, ``peers``, ``run_epoch``)
    are ``_op_<name>(args, blobs)`` methods decoding with :mod:`splitnn.common.serde`.

    Tensors cross this layer by reference. An operation that produces a tensor publishes it
    under the researcher's id (:class:`~splitnn.server.exports.Exports`); one that consumes
    another party's tensor pulls it over the peer stream (:class:`~splitnn.server.peers.Peers`)
    and puts it into the engine, which records the transfer on the receiving side, as in-process.

    Private set intersection. ``psi_request``/``psi_reply``/``psi_finish`` run one two-party PSI
    (:mod:`splitnn.training.alignment`) as in-process: each message is a 1-D uint8 tensor that its
    receiver pulls from its sender over their peer stream as kind ``psi`` (a pull of another kind
    cannot get it, and the researcher cannot ``fetch`` it) and records on that link; ``psi_size``
    is all the researcher learns; ``psi_apply`` gives this *session* the aligned rows (under the
    dataset's name, and each named part), so a party's own dataset (``--data``) stays as loaded for
    every other session; ``psi_cancel`` abandons an intersection. The party's policy decides first
    (:func:`~splitnn.workers.policy.check_psi`, in the engine): a run takes only a dataset the
    operator loaded (``--data``), never one the researcher placed or an intersection derived, at
    most ``max_psi_runs`` times, and messages go to and come from ``psi_peers`` only.

    Topologies and baselines. ``forward_merged``/``backward_merged`` (vertical split learning)
    pull every source activation like ``forward`` does and leave one gradient per source for its
    owner to pull; ``export_state``/``load_state`` hand a segment's weights (safetensors) from one
    worker to another over their peer stream as ``weights`` frames (the receiver pulls, loads and
    records them); ``average_states`` loads the weighted average of segments the session hosts into
    others (SplitFed's aggregation: local, nothing recorded); ``get_grads`` returns parameter gradients
    to the researcher (large-batch SGD).
    """

    def __init__(
        self,
        name: str,
        session: Session,
        *,
        sessions: Sessions,
        limits: Limits,
        trust: Trust | None = None,
        max_memory: int = DEFAULT_MAX_SESSION_MEMORY,
    ) -> None:
        self.name, self.session, self.sessions = name, session, sessions
        self.engine, self.exports, self.peers = session.engine, session.exports, session.peers
        self.limits, self.counters = limits, session.counters
        self.trust = trust or Trust()  # what add_segment may import (splitnn worker --trust)
        self.max_memory = max_memory  # what one forward of a segment may allocate (--max-session-memory)
        self.table: dict[str, Op] = {attr[4:]: getattr(self, attr) for attr in dir(self) if attr.startswith("_op_")}
        self.table.update({name: self._dispatcher(op) for name, op in OPERATIONS.items()})

    # -- helpers -------------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        """``key`` if this session may use that segment: PolicyError if only another session hosts one."""
        return self.sessions.check_segment(self.session, key)

    def _dataset(self, name: str) -> str:
        """A dataset name this session may read: PolicyError if another session placed it."""
        return self.sessions.check_dataset(self.session, name)

    def _claims(self, op: Operation) -> list[tuple[str, Callable[[Any], Any]]]:
        """The argument fields of ``op`` that name a segment, dataset or batch, with the check of each claim."""
        checks = {"segment": self._key, "dataset": self._dataset, "batch": self._batch}
        return [(f.name, checks[f.claim]) for f in op.args if f.claim in checks]

    @staticmethod
    def _claimed(claims: list[tuple[str, Callable[[Any], Any]]], args: dict) -> dict:
        """``args`` once every segment key and dataset name they hold is this session's to use (PolicyError)."""
        for name, check in claims:
            value = args[name]
            if value is not None:
                args[name] = [check(v) for v in value] if isinstance(value, (list, tuple)) else check(value)
        return args

    def _dispatcher(self, op: Operation) -> Op:
        """The table's operation ``op``: decode and check its arguments, then call the engine (or its handler)."""
        handler = getattr(self, f"_serve_{op.name}") if op.serve is None else None
        claims = self._claims(op)  # (once per operation, not per command)

        async def serve(a: dict, blobs: list[bytes], caller: str, state: StreamState) -> tuple[dict, list[bytes]]:
            args = self._claimed(claims, op.decode_args(a, blobs, limits=self.limits))
            if handler is not None:
                value = await handler(args, caller=caller, state=state)
            else:
                if op.caller is not None:
                    args[op.caller] = caller
                value = getattr(self.engine, op.serve)(**args)
            return op.encode_result(value) if op.result else ({}, [])

        async def run(a: dict, blobs: list[bytes], *, caller: str, state: StreamState, **_: Any):
            if not op.produces:
                return await serve(a, blobs, caller, state)
            # the outputs' ids first: whatever fails after, a peer waiting to pull one of them gets the error
            with self.exports.producing(state, *op.output_ids(a, limits=self.limits)):
                return await serve(a, blobs, caller, state)

        return run

    def check_plan_names(self, args: dict) -> None:
        """The segment keys and dataset a shipped epoch's plan names are not another session's."""
        stages = args.get("stages")
        for st in stages if isinstance(stages, list) else ():
            if isinstance(st, dict) and isinstance(st.get("key"), str):
                self._key(st["key"])
        if isinstance(args.get("dataset"), str):
            self._dataset(args["dataset"])

    async def _resolve(self, ref: TensorRef, kind: str) -> TensorRef:
        """An engine ref for a researcher ref: local, or pulled from its owner over the peer link."""
        if ref.owner == self.name:
            return self.exports.local(ref)
        arrived = await self.peers.pull(ref.owner, ref.id, kind)
        return self.engine.put(arrived, src=ref.owner, kind=kind)  # the receiver records the transfer

    async def _grad(self, grad: TensorRef | None) -> TensorRef | None:
        return await self._resolve(grad, "gradient") if grad is not None else None

    def _batch(self, batch: BatchRef | TensorRef) -> BatchRef | TensorRef:
        """``batch`` if this session may read its dataset and its indices are in range (a tensor ref: as it is)."""
        if not isinstance(batch, BatchRef):
            return batch
        name, idx = self._dataset(batch.dataset), batch.indices
        size = self.engine.dataset_stats(name).size
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise WireError(f"batch indices of dataset {name!r} out of range 0..{size - 1}")
        return batch

    # -- set-up ----------------------------------------------------------------------------------
    async def _op_hello(self, a, blobs, **_):
        # the party's own datasets only: what other sessions placed is theirs to know
        held = len(self.engine.segment_keys())  # 0: a new session (the worker restarted, or it expired)
        data = self.peers.peers.data_address  # where peers reach this worker's TCP data plane (None: over gRPC)
        return serde.hello_to_result(self.name, self.sessions.party_datasets(), str(self.engine.device), held, data), []

    #: the worker's :class:`~splitnn.server.health.Health` (set by the server)
    health = None

    async def _op_health(self, a, blobs, **_):
        """The worker's health for operators (``splitnn status``); nothing about any session's content."""
        from splitnn.server.health import open_sessions

        return (self.health.result(open_sessions(self.sessions)) if self.health is not None else {}), []

    async def _op_stats(self, a, blobs, **_):
        return serde.stats_to_result(self.counters.to_rows(), self.engine.ledger.to_rows()), []

    async def _op_peers(self, a, blobs, **_):
        """The peers of this session's model: ``{name: {"address": HOST:PORT, "session": TAG}}``.

        ``session`` is the tag of the researcher's session at that peer (default: this session's
        own, i.e. the same session id there); a plain ``HOST:PORT`` string means the same.
        """
        found = serde.peers_from_args(a, default_tag=self.session.tag)
        self.peers.addresses.update({peer: where for peer, where in found.items() if peer != self.name})
        return {}, []

    async def _serve_add_dataset(self, a: dict, **_: Any) -> None:
        name = a["name"]
        self.sessions.check_placing(name)
        held = a["parts"]()
        self.engine.add_dataset(name, **held, replace=a["replace"], allow_nonfinite=a["allow_nonfinite"])
        self.sessions.claim_dataset(self.session, name)

    async def _serve_put(self, a: dict, *, caller: str, **_: Any) -> None:
        self.exports.export(a["id"], self.engine.put(a["values"], src=caller, kind=a["kind"]))

    async def _serve_fetch(self, a: dict, **_: Any):
        ref = a["ref"]
        if ref.owner != self.name:
            raise WorkerError(f"worker {self.name!r} holds no tensor of {ref.owner!r}")
        value = self.engine.fetch(self.exports.produced(ref.id), kind=a["kind"])  # policy check
        self.exports.forget(ref.id)
        return value

    async def _serve_forward(self, a: dict, **_: Any) -> None:
        source = a["src"]
        if not isinstance(source, BatchRef):
            source = await self._resolve(source, "activation")
        self.exports.export(a["id"], self.engine.forward(a["key"], source, train=a["train"]))

    async def _serve_loss(self, a: dict, **_: Any):
        loss = check_loss_name(a["loss"])  # (the target was checked on decoding: both before the output is pulled)
        output = await self._resolve(a["output"], "activation")
        # keep: an evaluation whose outputs are kept for its metrics
        return self.engine.loss(output, a["target"], loss, train=a["train"], keep=a["keep"], divide=a["divide"])

    async def _serve_backward(self, a: dict, **_: Any) -> None:
        self.exports.export(a["id"], self.engine.backward(a["key"], await self._grad(a["grad"])))

    async def _serve_forward_merged(self, a: dict, **_: Any) -> None:
        """Pull every source activation from its owner (in parallel), merge, run the segment."""
        refs = await asyncio.gather(*(self._resolve(src, "activation") for src in a["srcs"]))
        self.exports.export(a["id"], self.engine.forward_merged(a["key"], list(refs), a["merge"], train=a["train"]))

    async def _serve_backward_merged(self, a: dict, **_: Any) -> None:
        """Back-propagate through the segment and its merge; export one gradient per source."""
        key, ids = a["key"], a["ids"]
        refs = self.engine.backward_merged(key, await self._grad(a["grad"]))
        if len(refs) != len(ids):
            raise WorkerError(
                f"worker {self.name!r}: segment {key!r} merged {len(refs)} sources, but "
                f"{len(ids)} gradient ids were given"
            )
        for tid, ref in zip(ids, refs):
            self.exports.export(tid, ref)

    async def _serve_release(self, a: dict, **_: Any) -> None:
        self.engine.release()  # this session's intermediate tensors only
        self.exports.cancel_all()

    async def _serve_end_session(self, a: dict, **_: Any) -> None:
        """The researcher is done: free everything this session holds now (no grace period, no resume)."""
        self.sessions.end(self.session)

    async def _serve_stage(self, a: dict, *, state: StreamState, **_: Any) -> None:
        state.stage(a["sid"], a["chunk"], self.limits.max_blob_bytes)

    async def _serve_add_segment(self, a: dict, **_: Any) -> None:
        # another session's segment of that name is its own: not touched
        key, optimizer, replace = a["key"], a["optimizer"], a["replace"]
        if self.engine.has_segment(key) and not replace:  # refused before the blobs are decoded or built
            raise ConfigurationError(
                f"worker {self.name!r} already hosts a segment {key!r} in this session; use another key, or "
                f"pass replace=True to replace it"
            )
        spec, state = a["spec"](), a["state"]()
        twin = check_state_fits_spec(spec, state, key, self.trust)  # before allocating the model
        if twin is None:
            raise MemoryBudgetError(
                f"segment {key!r} cannot be built on the meta device, so what it allocates cannot be checked "
                "before it runs; the worker runs only segments it can check (splitnn worker --max-session-memory)"
            )
        module = spec_to_module(spec, trust=self.trust)
        try:
            module.load_state_dict(state)
        except (RuntimeError, KeyError) as exc:
            raise WireError(f"weights for segment {key!r} do not fit its spec: {exc}") from None
        _freeze(module, a["frozen"], key)
        guard_segment(module, twin, self.max_memory, f"segment {key!r}: spec")  # each forward, on meta first
        self.engine.add_segment(key, module, optimizer, replace=replace, autocast=a["autocast"])
        self.session.installed = True
        self.sessions.claim_segment(self.session, key)

    async def _serve_remove_segment(self, a: dict, **_: Any) -> None:
        self.engine.remove_segment(a["key"])
        self.sessions.release_segment(self.session, a["key"])

    async def _serve_fetch_segment(self, a: dict, **_: Any) -> dict:
        module = self.engine.fetch_segment(a["key"])
        return {"spec": module_to_spec(module), "state": module.state_dict()}

    # -- the training step --------------------------------------------------------------------
    async def _op_run_epoch(self, a, blobs, **_):
        raise WireError("run_epoch runs only as a command of its own on a Session stream")

    # -- private set intersection ----------------------------------------------------------------
    # -- weights and outputs ------------------------------------------------------------------


def _freeze(module: torch.nn.Module, names: Sequence[str], key: str) -> None:
    """Freeze the parameters the researcher froze (before the engine builds the optimizer, which skips them)."""
    params = dict(module.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise WireError(f"segment {key!r}: 'frozen' names {unknown[0][:64]!r}, which is not one of its parameters")
    for name in names:
        params[name].requires_grad_(False)
