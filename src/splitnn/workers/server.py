"""WorkerServer: one party of split learning as a gRPC server (``splitnn worker``).

What it hosts. Segments, their optimizers and the party's datasets live in an
in-process :class:`~splitnn.workers.VirtualWorker` (the *engine*, ``fuse=False``),
so a networked party runs exactly the kernels, in exactly the order, of an
in-process one: the same seed gives the same weights, bit for bit. This module only
adds the network around it.

Three RPCs (see ``wire/proto/splitnn.proto``):

* ``Session`` -- one ordered bidirectional stream from the researcher. Each message
  is a protobuf :class:`Command` (the small control envelope; tensors ride inside it
  as validated :mod:`~splitnn.wire.tensor_codec` frames, weights as safetensors);
  each gets a :class:`Reply` carrying the result and the ledger records made since
  the previous reply. Commands run strictly in order, so the researcher may send a
  whole training step without waiting (see :mod:`splitnn.workers.remote`).
* ``Peer`` -- one persistent bidirectional stream between two workers carrying raw
  frames (:mod:`splitnn.transport.frames`): the data plane. When the researcher tells
  bob to run a segment on alice's activation #7, bob pulls #7 from alice over that
  stream; the researcher never sees the tensor.
* ``Call`` -- a unary version of one command (hello, stats), for tools and probes.

Shipped epochs (the fast path). A ``run_epoch`` command on the Session carries this
worker's part of a whole training epoch (:mod:`splitnn.workers.epoch`); the worker then
runs every batch itself (:mod:`splitnn.workers.shipped`), *pushing* activations to its
next party and gradients to its previous one as PUSH frames on the same peer streams,
and answers with progress replies (the label holder's losses) and one final reply
carrying its ledger records. Only the parties a plan names as adjacent may push to it.

Topologies and baselines. ``forward_merged``/``backward_merged`` (vertical split learning)
pull every source activation like ``forward`` does and leave one gradient per source for its
owner to pull; ``export_state``/``load_state`` hand a segment's weights (safetensors) from one
worker to another over their peer stream as ``weights`` frames (the receiver pulls, loads and
records them); ``get_grads`` returns parameter gradients to the researcher (large-batch SGD).

Why asyncio. A worker waits on several things at once: its researcher's commands,
peers pulling the tensors it produced, and its own pulls from peers that may not
have produced them yet. With ``grpc.aio`` these are coroutines on one event loop:
no thread per stream, no locks around the engine (an engine operation never awaits,
so nothing interleaves inside one), and a pull that arrives before its tensor exists
simply awaits a future. The compute itself runs inline on the loop: operations are
milliseconds long, strictly ordered by the training schedule, and a thread hop per
operation would cost more than it saves.

Security. Every RPC must carry the federation token (``UNAUTHENTICATED`` otherwise);
with mutual TLS the caller's certificate must name the party it claims to be.
Malformed, truncated or oversized messages get ``INVALID_ARGUMENT`` (or an error
reply) and the server keeps serving. The engine's policy refuses to hand out raw
features, labels and -- by default on a server -- activations; losses, metrics and
weights (at ``collect()``) are what leaves a worker towards the researcher.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import grpc
import torch
from google.protobuf.message import DecodeError

from splitnn import errors as _errors
from splitnn.accounting import RESEARCHER
from splitnn.errors import SplitNNError, WireError, WorkerError
from splitnn.transport import frames
from splitnn.transport.counters import ByteCounters
from splitnn.transport.limits import Limits
from splitnn.transport.security import (
    PARTY_KEY,
    TOKEN_KEY,
    TLSConfig,
    call_metadata,
    check_token_text,
    peer_identities,
    token_matches,
)
from splitnn.wire.optim_spec import OptimizerSpec
from splitnn.wire.proto import SERVICE, PEER, Command, Reply, Transfer
from splitnn.wire.spec import module_to_spec, spec_from_json, spec_to_json, spec_to_module
from splitnn.wire.state_codec import decode_state, encode_state
from splitnn.wire.tensor_codec import decode_tensor, encode_tensor
from splitnn.workers import shipped
from splitnn.workers.refs import BatchRef, TensorRef
from splitnn.workers.virtual import VirtualWorker, WorkerPolicy

log = logging.getLogger("splitnn.worker")

MAX_NAME = 64
PROTOCOL_VERSION = 1


def check_party_name(name: object) -> str:
    """A party name: 1-64 printable ASCII characters, no spaces."""
    if (not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isascii()
            or not name.isprintable() or " " in name):
        raise WireError(f"party name must be 1-{MAX_NAME} printable ASCII characters without spaces, got {name!r}")
    return name


# ---------------------------------------------------------------------------- arguments
def _get(args: dict, key: str, kind: type | tuple, *, optional: bool = False) -> Any:
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


def _ref(value: object) -> TensorRef:
    if not isinstance(value, dict):
        raise WireError("a tensor ref must be an object {owner, id}")
    return TensorRef(check_party_name(_get(value, "owner", str)), _get(value, "id", int))


def _blob(blobs: list[bytes], i: int, what: str) -> bytes:
    if i >= len(blobs):
        raise WireError(f"command is missing its {what} blob")
    return blobs[i]


#: Wire-counter kind of a command's bytes, by op (everything else is "control").
_COMMAND_KIND = {"add_segment": "weights", "set_state": "weights", "put": "features", "add_dataset": "data",
                 "stage": "data"}
_REPLY_KIND = {"fetch": "output", "get_state": "weights", "fetch_segment": "weights", "get_grads": "gradient"}
#: Largest number of sources one ``forward_merged`` may merge.
MAX_MERGE_SOURCES = 256


def register_known_layers() -> None:
    """Teach this process's spec codec every layer type splitnn ships beyond the basic ones.

    The defense layers of :mod:`splitnn.privacy` (``NoPeek``, ``CutNoise``,
    ``LabelProtection``) register their specs when that package is imported; a worker
    imports it at start so that a defended segment can be hosted remotely. Imported
    here, lazily, because ``privacy`` sits beside ``workers`` (it imports them), not below.
    """
    import splitnn.privacy.defenses  # noqa: F401  (registers the defense layer specs)


@dataclass
class _SessionState:
    staged: dict[int, bytearray] = field(default_factory=dict)
    staged_bytes: int = 0
    exports: set[int] = field(default_factory=set)  # tensor ids this session announced (dropped at its end)


class _PeerLink:
    """One persistent bidirectional stream to another worker, carrying raw frames.

    Symmetric: whichever side dialled, both sides may pull tensors over it.
    """

    def __init__(self, server: "WorkerServer", peer: str, send: Callable[[bytes], Awaitable[None]],
                 read: Callable[[], Awaitable[Any]]) -> None:
        self.server, self.peer = server, peer
        self._send, self._read = send, read
        self._lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future] = {}
        self._reasm = frames.Reassembler(server.limits.max_tensor_bytes)
        self._push_reasm = frames.Reassembler(server.limits.max_tensor_bytes)
        self.closed: BaseException | None = None
        self.protocol_error: WireError | None = None

    async def send(self, frame: bytes, kind: str) -> None:
        """Put one frame on the stream; a broken stream raises WorkerError naming the peer."""
        if self.closed is not None:
            raise WorkerError(f"worker {self.server.name!r}: lost the connection to peer {self.peer!r}")
        try:
            async with self._lock:
                await self._send(frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # grpc raises assorted types for a write on a dead stream
            raise WorkerError(f"worker {self.server.name!r}: lost the connection to peer {self.peer!r} "
                              f"({_rpc_text(exc) or type(exc).__name__})") from None
        self.server.counters.record(self.peer, "sent", kind, len(frame))

    async def pull(self, tensor_id: int, kind: str) -> torch.Tensor:
        me, timeout = self.server.name, self.server.peer_timeout
        if self.closed is not None:
            raise WorkerError(f"worker {me!r}: the connection to peer {self.peer!r} is closed ({self.closed})")
        fut = asyncio.get_running_loop().create_future()
        self._pending[tensor_id] = fut
        try:
            await self.send(frames.request(kind, tensor_id), "control")
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise WorkerError(f"worker {me!r}: peer {self.peer!r} did not send {kind} #{tensor_id} within "
                              f"{timeout:g} s (is it alive?)") from None
        except grpc.RpcError as exc:
            raise WorkerError(f"worker {me!r}: cannot reach peer {self.peer!r}: {_rpc_text(exc)}") from None
        finally:
            self._pending.pop(tensor_id, None)

    async def run(self) -> None:
        """Read frames until the stream ends; serve pulls, deliver pulled tensors."""
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                raw = await self._read()
                if raw is grpc.aio.EOF or raw is None:
                    break
                try:
                    hdr, chunk = frames.parse(raw)
                except WireError as exc:
                    self.server.counters.record(self.peer, "recv", "invalid", len(raw))
                    self.protocol_error = exc
                    break
                self.server.counters.record(self.peer, "recv", hdr.kind if hdr.type in frames.PAYLOAD_TYPES
                                            else "control", len(raw))
                if hdr.type == frames.PUSH:
                    self._pushed(hdr, chunk)
                    continue
                if hdr.type == frames.ABORT:
                    self.server.inbox.peer_aborted(self.peer, hdr.id, bytes(chunk).decode("utf-8", "replace"))
                    continue
                if hdr.type == frames.REQUEST:
                    task = asyncio.create_task(self._serve(hdr))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    continue
                fut = self._pending.get(hdr.id)
                if fut is None or fut.done():
                    self._reasm.drop(hdr.id)
                    continue  # an answer nobody waits for any more (timed out): ignore
                if hdr.type == frames.ERROR:
                    fut.set_exception(WorkerError(bytes(chunk).decode("utf-8", "replace")))
                    continue
                try:
                    tensor = self._reasm.feed(hdr, chunk)
                except WireError as exc:
                    fut.set_exception(WireError(f"worker {self.server.name!r}: bad tensor from {self.peer!r}: {exc}"))
                    continue
                if tensor is not None:
                    fut.set_result(tensor)
        except (grpc.RpcError, asyncio.CancelledError) as exc:
            self.closed = exc
        finally:
            if self.closed is None:
                self.closed = self.protocol_error or ConnectionError("stream ended")
            for task in tasks:
                task.cancel()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(WorkerError(
                        f"worker {self.server.name!r}: lost the connection to peer {self.peer!r}"))
            self.server._forget_link(self)
            self.server.inbox.peer_lost(self.peer)

    def _pushed(self, hdr: frames.FrameHeader, chunk: memoryview) -> None:
        """A PUSH chunk of a shipped epoch: reassemble, then hand to the inbox (which checks the sender)."""
        if hdr.kind == "weights":  # weights are only ever pulled (load_state), never pushed
            self.server.counters.record(self.peer, "recv", "refused", 0)
            return
        try:
            tensor = self._push_reasm.feed(hdr, chunk)
        except WireError as exc:
            tensor = WireError(f"worker {self.server.name!r}: bad tensor pushed by {self.peer!r}: {exc}")
        if tensor is not None and not self.server.inbox.deliver(self.peer, hdr.kind, hdr.id, tensor):
            self.server.counters.record(self.peer, "recv", "refused", 0)
            log.warning("worker %s: refused a %s pushed by %s (not expected from it)", self.server.name,
                        hdr.kind, self.peer)

    async def _serve(self, hdr: frames.FrameHeader) -> None:
        try:
            tensor = await self.server._take_export(hdr.id, hdr.kind, self.peer)
            for frame in frames.data_frames(hdr.kind, hdr.id, tensor, self.server.limits.chunk_bytes):
                await self.send(frame, hdr.kind)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # tell the puller why, then keep serving
            try:
                await self.send(frames.error(hdr.kind, hdr.id, f"{type(exc).__name__}: {exc}"), "control")
            except Exception:
                pass


def _rpc_text(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        try:
            return f"{exc.code().name}: {exc.details()}"
        except Exception:  # pragma: no cover - defensive
            pass
    return str(exc)


class WorkerServer:
    """A party serving its segments, optimizers and datasets over gRPC.

    Args:
        name: the party's name (as in the ledger and, with TLS, in its certificate).
        token: the federation token every caller must present.
        tls: this party's certificate/key and the federation CA (mutual TLS), or None.
        limits: message and tensor size limits.
        peer_timeout: seconds to wait for a peer's tensor before failing the step.
        policy: what the engine hands to the researcher; by default no activations.
    """

    def __init__(self, name: str, token: str, *, tls: TLSConfig | None = None, limits: Limits | None = None,
                 peer_timeout: float = 60.0, policy: WorkerPolicy | None = None) -> None:
        self.name = check_party_name(name)
        if name == RESEARCHER:
            raise _errors.ConfigurationError(f"a worker cannot be called {RESEARCHER!r}")
        self.token = check_token_text(token)
        self.tls = tls
        self.limits = limits or Limits()
        if not (isinstance(peer_timeout, (int, float)) and 0 < peer_timeout < math.inf):
            raise _errors.ConfigurationError(f"peer_timeout must be a positive number of seconds, got {peer_timeout!r}")
        self.peer_timeout = float(peer_timeout)
        register_known_layers()
        self.engine = VirtualWorker(name, fuse=False, policy=policy or WorkerPolicy(release_outputs=False))
        self.inbox = shipped.Inbox(self.name, self.peer_timeout)
        self.counters = ByteCounters()
        self.address: str | None = None
        self._exports: dict[int, asyncio.Future] = {}
        self._reported: dict[tuple[str, str, str], tuple[int, int]] = {}
        self._peer_addresses: dict[str, str] = {}
        self._links: dict[str, _PeerLink] = {}
        self._dialing: dict[str, asyncio.Lock] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._server: grpc.aio.Server | None = None
        self._ops: dict[str, Callable[..., Awaitable[tuple[dict, list[bytes]]]]] = {
            name[4:]: getattr(self, name) for name in dir(self) if name.startswith("_op_")}

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self, listen: str) -> str:
        """Listen on ``host:port`` (port 0: any free port); return the bound ``host:port``."""
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise _errors.ConfigurationError(f"--listen must be HOST:PORT like 127.0.0.1:7001, got {listen!r}")
        server = grpc.aio.server(options=self.limits.grpc_options() + [("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Call": grpc.unary_unary_rpc_method_handler(self._call),
            "Session": grpc.stream_stream_rpc_method_handler(self._session),
            "Peer": grpc.stream_stream_rpc_method_handler(self._peer),
        }),))
        try:
            if self.tls is not None:
                bound = server.add_secure_port(listen, self.tls.server_credentials())
            else:
                bound = server.add_insecure_port(listen)
        except RuntimeError as exc:
            raise WorkerError(f"worker {self.name!r} cannot listen on {listen}: {exc}") from None
        if not bound:
            raise WorkerError(f"worker {self.name!r} cannot listen on {listen} (address in use or not local?)")
        await server.start()
        self._server = server
        self.address = f"{host}:{bound}"
        return self.address

    async def stop(self, grace: float = 2.0) -> None:
        """Stop accepting calls, let running ones finish for ``grace`` seconds, close peer links."""
        if self._server is not None:
            await self._server.stop(grace)
        for ch in self._channels:
            await ch.close()
        self._channels.clear()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # -- authentication -------------------------------------------------------------------
    async def _authenticate(self, context: grpc.aio.ServicerContext) -> str:
        md = {k: v for k, v in (context.invocation_metadata() or ())}
        token = md.get(TOKEN_KEY)
        if not isinstance(token, str) or not token_matches(token, self.token):
            self.counters.record(md.get(PARTY_KEY, "?") if isinstance(md.get(PARTY_KEY), str) else "?",
                                 "recv", "rejected", 0)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"worker {self.name!r}: missing or wrong federation token")
        party = md.get(PARTY_KEY)
        try:
            check_party_name(party)
        except WireError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"worker {self.name!r}: {exc}")
        if self.tls is not None and self.tls.ca is not None:
            ids = peer_identities(context.auth_context())
            if party not in ids:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    f"worker {self.name!r}: caller claims to be {party!r} but its certificate is "
                                    f"for {sorted(ids) or 'nobody'}")
        return party

    # -- RPC handlers ----------------------------------------------------------------------
    async def _call(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        caller = await self._authenticate(context)
        cmd = await self._parse(raw, caller, context)
        state = _SessionState()
        try:
            reply = await self._execute(cmd, caller, state)
        finally:
            self._drop_exports(state)
        return self._send_reply(reply, caller, cmd.op)

    async def _session(self, request_iterator, context: grpc.aio.ServicerContext):
        caller = await self._authenticate(context)
        state = _SessionState()
        try:
            async for raw in request_iterator:
                cmd = await self._parse(raw, caller, context)
                if cmd.op == "run_epoch":
                    async for reply in self._run_epoch(cmd):
                        yield self._send_reply(reply, caller, cmd.op)
                    continue
                reply = await (self._execute_batch(cmd, caller, state) if cmd.op == "batch"
                               else self._execute(cmd, caller, state))
                for part in self._split_reply(reply):
                    yield self._send_reply(part, caller, cmd.op)
        finally:
            self._drop_exports(state)

    def _announce(self, state: _SessionState, tid: int) -> None:
        """Remember that this session announced tensor id ``tid`` (pruned of consumed ids now and then)."""
        state.exports.add(tid)
        if len(state.exports) > 4096:
            state.exports &= self._exports.keys()

    def _drop_exports(self, state: _SessionState) -> None:
        """Forget the tensor ids a finished session announced (a later session may reuse them)."""
        for tid in state.exports:
            fut = self._exports.pop(tid, None)
            if fut is not None and not fut.done():
                fut.cancel()
        state.exports.clear()

    async def _peer(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        caller = await self._authenticate(context)
        if caller == RESEARCHER or caller == self.name:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"worker {self.name!r}: {caller!r} is not a peer")
        link = _PeerLink(self, caller, context.write, context.read)
        self._links.setdefault(caller, link)
        await link.run()
        if link.protocol_error is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"worker {self.name!r}: malformed peer frame: {link.protocol_error}")

    async def _parse(self, raw: bytes, caller: str, context: grpc.aio.ServicerContext) -> Command:
        try:
            cmd = Command.FromString(raw)
        except (DecodeError, TypeError, ValueError) as exc:
            self.counters.record(caller, "recv", "invalid", len(raw) if isinstance(raw, bytes) else 0)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"worker {self.name!r}: malformed command: {exc}")
        self.counters.record(caller, "recv", _COMMAND_KIND.get(cmd.op, "control"), len(raw))
        return cmd

    def _split_reply(self, reply: Reply) -> list[Reply]:
        """Cut a reply whose blobs exceed one message into parts (see ``Reply.more`` in the .proto)."""
        sizes = [len(b) for b in reply.blobs]
        if sum(sizes) <= self.limits.chunk_bytes:
            return [reply]
        whole = b"".join(reply.blobs)
        chunk = self.limits.chunk_bytes
        parts = [Reply(seq=reply.seq, ok=True, more=True, blobs=[whole[i:i + chunk]])
                 for i in range(0, len(whole), chunk)]
        result = json.loads(reply.result_json) if reply.result_json else {}
        result["_blob_sizes"] = sizes
        last = Reply(seq=reply.seq, ok=True, result_json=json.dumps(result))
        last.transfers.extend(reply.transfers)
        return parts + [last]

    def _send_reply(self, reply: Reply, caller: str, op: str) -> bytes:
        data = reply.SerializeToString()
        if len(data) > self.limits.max_message_bytes:
            data = Reply(seq=reply.seq, ok=False, error_type="WireError",
                         error=f"worker {self.name!r}: the reply to {op!r} is {len(data)} bytes, over the "
                               f"{self.limits.max_message_bytes}-byte message limit").SerializeToString()
        self.counters.record(caller, "sent", _REPLY_KIND.get(op, "control") if reply.ok else "control", len(data))
        return data

    # -- command execution ----------------------------------------------------------------
    async def _execute(self, cmd: Command, caller: str, state: _SessionState, *, report: bool = True) -> Reply:
        reply = Reply(seq=cmd.seq)
        try:
            op = self._ops.get(cmd.op)
            if op is None:
                raise WireError(f"unknown command {cmd.op[:64]!r}")
            try:
                args = json.loads(cmd.args_json) if cmd.args_json else {}
            except (ValueError, RecursionError) as exc:
                raise WireError(f"command arguments are not valid JSON: {exc}") from None
            if not isinstance(args, dict):
                raise WireError("command arguments must be a JSON object")
            blobs = self._unstage(args, list(cmd.blobs), state)
            result, out_blobs = await op(args, blobs, caller=caller, state=state)
            reply.ok = True
            if result:
                reply.result_json = json.dumps(result)
            reply.blobs.extend(out_blobs)
        except Exception as exc:  # every failure becomes an error reply; the server keeps serving
            self._fill_error(reply, exc)
            if not isinstance(exc, SplitNNError):
                log.debug("command %s failed", cmd.op, exc_info=True)
        if report:
            reply.transfers.extend(self._ledger_delta())
        return reply

    def _fill_error(self, reply: Reply, exc: BaseException) -> None:
        reply.ok = False
        known = isinstance(exc, SplitNNError) or type(exc) in (RuntimeError, IndexError)
        reply.error_type = type(exc).__name__ if known else "WorkerError"
        text = str(exc) if known else f"{type(exc).__name__}: {exc}"
        reply.error = text if f"{self.name!r}" in text else f"worker {self.name!r}: {text}"

    # -- shipped epochs ---------------------------------------------------------------------
    async def _run_epoch(self, cmd: Command):
        """Run a shipped epoch: progress replies (label holder's losses), then one final reply.

        On failure (or when the researcher goes away) the adjacent peers get an ABORT frame,
        so they fail at once instead of waiting for tensors that will not come.
        """
        plan = run = None
        batches = 0
        final = Reply(seq=cmd.seq)
        try:
            try:
                args = json.loads(cmd.args_json) if cmd.args_json else {}
            except (ValueError, RecursionError) as exc:
                raise WireError(f"command arguments are not valid JSON: {exc}") from None
            if not isinstance(args, dict):
                raise WireError("command arguments must be a JSON object")
            plan = shipped.parse_plan(args, list(cmd.blobs), engine=self.engine, peers=set(self._peer_addresses),
                                      max_blob_bytes=self.limits.max_blob_bytes)
            run = self.inbox.start(plan)
            for peer in {p for st in plan.stages for p in (st.prev, st.next)} - {None, self.name}:
                await self._link(peer)  # dial the adjacent parties now: a dead one fails the epoch early

            async def receive(peer: str, kind: str, fid: int) -> torch.Tensor:
                fut = self.inbox.slot(run, peer, kind, fid)
                if peer not in self._links:
                    await self._link(peer)  # re-dial; a dead peer fails the wait (Inbox.peer_lost)
                return await self.inbox.wait(run, peer, kind, fid, fut)

            async for losses in shipped.run_epoch(self.engine, plan, self._push, receive):
                batches += len(losses)
                yield Reply(seq=cmd.seq, ok=True, progress=True, result_json=json.dumps(shipped.losses_json(losses)))
            final.ok = True
            final.result_json = json.dumps({"batches": plan.num_batches})
        except Exception as exc:
            self._fill_error(final, exc)
            self.engine.release()  # drop the failed batch's intermediate tensors
            if plan is not None:
                self._abort_peers(plan, final.error)
        except BaseException:  # cancelled: the researcher's session went away
            if plan is not None:
                self._abort_peers(plan, f"worker {self.name!r}: the researcher's session ended")
            raise
        finally:
            if run is not None:
                self.inbox.finish(run)
        final.transfers.extend(self._ledger_delta())
        yield final

    def _abort_peers(self, plan, text: str) -> None:
        """Best effort, without waiting: tell the plan's adjacent parties that this part failed."""
        frame = frames.abort(plan.run_id, text)

        async def send(link: _PeerLink) -> None:
            try:
                await link.send(frame, "control")
            except Exception:
                pass

        for peer in {p for st in plan.stages for p in (st.prev, st.next)} - {None, self.name}:
            link = self._links.get(peer)
            if link is not None and link.closed is None:
                asyncio.get_running_loop().create_task(send(link))

    async def _push(self, peer: str, kind: str, fid: int, tensor: torch.Tensor) -> None:
        link = await self._link(peer)
        try:
            for frame in frames.data_frames(kind, fid, tensor, self.limits.chunk_bytes, type_=frames.PUSH):
                await link.send(frame, kind)
        except WorkerError:
            raise
        except Exception as exc:
            raise WorkerError(f"worker {self.name!r}: cannot send {kind} to peer {peer!r}: "
                              f"{_rpc_text(exc) or type(exc).__name__}") from None

    async def _execute_batch(self, batch: Command, caller: str, state: _SessionState) -> Reply:
        """Run coalesced commands in order; answer with the last one's result and the first error."""
        if batch.args_json or len(batch.blobs) > 1024:
            return Reply(seq=batch.seq, ok=False, error_type="WireError",
                         error=f"worker {self.name!r}: malformed command batch")
        first_error: Reply | None = None
        reply = Reply(seq=batch.seq, ok=True)
        for raw in batch.blobs:
            try:
                cmd = Command.FromString(raw)
            except DecodeError as exc:
                cmd = None
                reply = Reply(ok=False, error_type="WireError", error=f"worker {self.name!r}: malformed command: {exc}")
            if cmd is not None:
                if cmd.op == "batch":
                    reply = Reply(ok=False, error_type="WireError", error=f"worker {self.name!r}: nested batch")
                else:
                    reply = await self._execute(cmd, caller, state, report=False)
            if not reply.ok and first_error is None:
                first_error = reply
        out = first_error if first_error is not None else reply
        out.seq = batch.seq
        del out.transfers[:]
        out.transfers.extend(self._ledger_delta())
        return out

    def _unstage(self, args: dict, blobs: list[bytes], state: _SessionState) -> list[bytes]:
        staged = args.get("_staged")
        if not staged:
            return blobs
        if not isinstance(staged, dict):
            raise WireError("'_staged' must map blob indices to staged upload ids")
        for index, sid in staged.items():
            if not (isinstance(index, str) and index.isdigit() and int(index) < len(blobs) and isinstance(sid, int)):
                raise WireError("'_staged' names a blob that does not exist")
            buf = state.staged.pop(sid, None)
            if buf is None:
                raise WireError(f"no staged upload #{sid}")
            state.staged_bytes -= len(buf)
            blobs[int(index)] = bytes(buf)
        return blobs

    def _ledger_delta(self) -> list[Transfer]:
        out = []
        for link in self.engine.ledger.links():
            key = (link.src, link.dst, link.kind)
            c0, b0 = self._reported.get(key, (0, 0))
            if (link.count, link.nbytes) != (c0, b0):
                out.append(Transfer(src=link.src, dst=link.dst, kind=link.kind, count=link.count - c0,
                                    nbytes=link.nbytes - b0))
                self._reported[key] = (link.count, link.nbytes)
        return out

    # -- exports: tensors this worker produced, by the researcher's id --------------------------
    def _export_future(self, tid: int) -> asyncio.Future:
        fut = self._exports.get(tid)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"
            self._exports[tid] = fut
        return fut

    def _export(self, tid: int | None, ref: TensorRef | None) -> None:
        if tid is None:
            if ref is not None:  # nobody will ask for it
                self.engine._take(ref.id)
            return
        if ref is None:
            raise WorkerError(f"worker {self.name!r}: expected to produce tensor #{tid} but produced nothing")
        fut = self._export_future(tid)
        if fut.done():
            raise WireError(f"worker {self.name!r}: tensor id #{tid} is already in use")
        fut.set_result(ref.id)

    def _fail_export(self, tid: int | None, exc: BaseException) -> None:
        if tid is None:
            return
        fut = self._export_future(tid)
        if not fut.done():
            fut.set_exception(WorkerError(f"worker {self.name!r} could not produce tensor #{tid}: {exc}"))

    def _local(self, ref: TensorRef) -> TensorRef:
        fut = self._exports.pop(ref.id, None)
        if fut is None or not fut.done() or fut.cancelled():
            raise WorkerError(f"worker {self.name!r} holds no tensor #{ref.id} (already consumed or released)")
        if fut.exception() is not None:
            raise fut.exception()
        return TensorRef(self.name, fut.result())

    async def _take_export(self, tid: int, kind: str, peer: str) -> torch.Tensor:
        if peer not in self._peer_addresses:
            raise _errors.PolicyError(f"worker {self.name!r} hands tensors only to the peers of its model "
                                      f"({sorted(self._peer_addresses)}), not to {peer!r}")
        fut = self._export_future(tid)
        try:
            engine_id = await asyncio.wait_for(asyncio.shield(fut), self.peer_timeout)
        except asyncio.TimeoutError:
            raise WorkerError(f"worker {self.name!r} did not produce tensor #{tid} within {self.peer_timeout:g} s") from None
        self._exports.pop(tid, None)
        stored = self.engine._store.get(engine_id)
        if stored is not None and (stored[1] == "weights") != (kind == "weights"):
            raise WorkerError(f"worker {self.name!r}: tensor #{tid} is not a {kind}")
        return self.engine._take(engine_id)  # PolicyError for raw features / labels

    async def _resolve(self, value: object, kind: str) -> TensorRef:
        """An engine ref for a researcher ref: local, or pulled from its owner over the peer link."""
        ref = _ref(value)
        if ref.owner == self.name:
            return self._local(ref)
        link = await self._link(ref.owner)
        tensor = await link.pull(ref.id, kind)
        return self.engine.put(tensor, src=ref.owner, kind=kind)  # the receiver records the transfer

    # -- peer links -------------------------------------------------------------------------
    async def _link(self, peer: str) -> _PeerLink:
        link = self._links.get(peer)
        if link is not None and link.closed is None:
            return link
        lock = self._dialing.setdefault(peer, asyncio.Lock())
        async with lock:
            link = self._links.get(peer)
            if link is not None and link.closed is None:
                return link
            address = self._peer_addresses.get(peer)
            if address is None:
                raise WorkerError(f"worker {self.name!r} does not know how to reach {peer!r}; the researcher "
                                  f"must connect the model's workers first")
            options = self.limits.grpc_options()
            if self.tls is not None:
                options = options + [("grpc.ssl_target_name_override", peer)]
                channel = grpc.aio.secure_channel(address, self.tls.channel_credentials(), options=options)
            else:
                channel = grpc.aio.insecure_channel(address, options=options)
            self._channels.append(channel)
            call = channel.stream_stream(PEER, request_serializer=None, response_deserializer=None)(
                metadata=call_metadata(self.token, self.name))
            link = _PeerLink(self, peer, call.write, call.read)
            self._links[peer] = link
            asyncio.get_running_loop().create_task(link.run())
            return link

    def _forget_link(self, link: _PeerLink) -> None:
        if self._links.get(link.peer) is link:
            del self._links[link.peer]

    # -- operations (``_op_<name>``: args, blobs -> result, blobs) ------------------------------------
    async def _op_hello(self, a, blobs, **_):
        return {"name": self.name, "protocol": PROTOCOL_VERSION, "datasets": sorted(self.engine._data)}, []

    async def _op_stats(self, a, blobs, **_):
        return {"counters": self.counters.to_rows(), "ledger": self.engine.ledger.to_rows()}, []

    async def _op_peers(self, a, blobs, **_):
        peers = _get(a, "peers", dict)
        for peer, address in peers.items():
            check_party_name(peer)
            if not isinstance(address, str) or ":" not in address or len(address) > 256:
                raise WireError(f"peer {peer!r} has a malformed address {address!r}")
            if peer != self.name:
                self._peer_addresses[peer] = address
        return {}, []

    async def _op_stage(self, a, blobs, *, state: _SessionState, **_):
        sid = _get(a, "sid", int)
        chunk = _blob(blobs, 0, "chunk")
        if state.staged_bytes + len(chunk) > self.limits.max_blob_bytes:
            state.staged.clear()
            state.staged_bytes = 0
            raise WireError(f"staged uploads exceed the {self.limits.max_blob_bytes}-byte limit")
        state.staged.setdefault(sid, bytearray()).extend(chunk)
        state.staged_bytes += len(chunk)
        return {}, []

    async def _op_add_segment(self, a, blobs, **_):
        key = _get(a, "key", str)
        opt = _get(a, "optimizer", dict, optional=True)
        module = spec_to_module(spec_from_json(_blob(blobs, 0, "spec")))
        state = decode_state(_blob(blobs, 1, "state"), max_bytes=self.limits.max_blob_bytes)
        try:
            module.load_state_dict(state)
        except (RuntimeError, KeyError) as exc:
            raise WireError(f"weights for segment {key!r} do not fit its spec: {exc}") from None
        self.engine.add_segment(key, module, OptimizerSpec.from_dict(opt) if opt is not None else None)
        return {}, []

    async def _op_remove_segment(self, a, blobs, **_):
        self.engine.remove_segment(_get(a, "key", str))
        return {}, []

    async def _op_add_dataset(self, a, blobs, **_):
        name = _get(a, "name", str)
        parts = _get(a, "parts", list)
        if not parts or any(p not in ("features", "labels") for p in parts) or len(parts) != len(set(parts)):
            raise WireError("'parts' must list 'features' and/or 'labels'")
        tensors = {p: decode_tensor(_blob(blobs, i, p), max_bytes=self.limits.max_blob_bytes)
                   for i, p in enumerate(parts)}
        self.engine.add_dataset(name, **tensors)
        return {}, []

    async def _op_dataset_stats(self, a, blobs, **_):
        s = self.engine.dataset_stats(_get(a, "name", str))
        return {"name": s.name, "size": s.size, "feature_shape": s.feature_shape, "num_labels": s.num_labels,
                "label_max": s.label_max}, []

    async def _op_probe(self, a, blobs, **_):
        shape = _get(a, "shape", list)
        if not 0 < len(shape) <= 8 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 20
                                              for d in shape) or math.prod(shape) > 1 << 26:
            raise WireError(f"probe shape {shape!r} is not a small positive shape")
        return {"shape": list(self.engine.probe(_get(a, "key", str), tuple(shape)))}, []

    def _indices(self, blobs: list[bytes], i: int = 0) -> torch.Tensor:
        idx = decode_tensor(_blob(blobs, i, "indices"), max_bytes=self.limits.max_blob_bytes,
                            allowed_dtypes=(torch.int64,), max_ndim=1)
        if idx.dim() != 1:
            raise WireError("batch indices must be a 1-D int64 tensor")
        return idx

    def _batch(self, a: dict, blobs: list[bytes]) -> BatchRef:
        name = _get(a, "dataset", str)
        idx = self._indices(blobs)
        size = self.engine.dataset_stats(name).size
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise WireError(f"batch indices of dataset {name!r} out of range 0..{size - 1}")
        return BatchRef(name, idx)

    async def _op_put(self, a, blobs, *, caller: str, state: _SessionState, **_):
        tid, kind = _get(a, "id", int), _get(a, "kind", str)
        self._announce(state, tid)
        if kind not in ("features",):
            raise WireError(f"the researcher may only put 'features', not {kind!r}")
        try:
            tensor = decode_tensor(_blob(blobs, 0, "tensor"), max_bytes=self.limits.max_tensor_bytes)
            self._export(tid, self.engine.put(tensor, src=caller, kind=kind))
        except Exception as exc:
            self._fail_export(tid, exc)
            raise
        return {}, []

    async def _op_forward(self, a, blobs, *, state: _SessionState, **_):
        tid = _get(a, "id", int)
        self._announce(state, tid)
        try:
            key, train = _get(a, "key", str), _get(a, "train", bool)
            src = _get(a, "src", dict)
            source = self._batch(src, blobs) if "dataset" in src else await self._resolve(src, "activation")
            self._export(tid, self.engine.forward(key, source, train=train))
        except Exception as exc:
            self._fail_export(tid, exc)
            raise
        return {}, []

    async def _op_loss(self, a, blobs, **_):
        output = await self._resolve(_get(a, "output", dict), "activation")
        stats = self.engine.loss(output, self._batch(a, blobs), _get(a, "loss", str), train=_get(a, "train", bool))
        return {"loss": stats.loss, "correct": stats.correct, "count": stats.count}, []

    async def _op_backward(self, a, blobs, *, state: _SessionState, **_):
        tid = _get(a, "id", int, optional=True)
        if tid is not None:
            self._announce(state, tid)
        try:
            key = _get(a, "key", str)
            grad = a.get("grad")
            grad_ref = await self._resolve(grad, "gradient") if grad is not None else None
            self._export(tid, self.engine.backward(key, grad_ref))
        except Exception as exc:
            self._fail_export(tid, exc)
            raise
        return {}, []

    async def _op_forward_merged(self, a, blobs, *, state: _SessionState, **_):
        """Pull every source activation from its owner (in parallel), merge, run the segment."""
        tid = _get(a, "id", int)
        self._announce(state, tid)
        try:
            key, train, merge = _get(a, "key", str), _get(a, "train", bool), _get(a, "merge", str)
            srcs = _get(a, "srcs", list)
            if not 0 < len(srcs) <= MAX_MERGE_SOURCES:
                raise WireError(f"forward_merged takes 1..{MAX_MERGE_SOURCES} sources, got {len(srcs)}")
            refs = await asyncio.gather(*(self._resolve(src, "activation") for src in srcs))
            self._export(tid, self.engine.forward_merged(key, list(refs), merge, train=train))
        except Exception as exc:
            self._fail_export(tid, exc)
            raise
        return {}, []

    async def _op_backward_merged(self, a, blobs, *, state: _SessionState, **_):
        """Back-propagate through the segment and its merge; export one gradient per source."""
        ids = _get(a, "ids", list)
        if not 0 < len(ids) <= MAX_MERGE_SOURCES or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**63 for i in ids):
            raise WireError(f"backward_merged needs 1..{MAX_MERGE_SOURCES} tensor ids")
        for tid in ids:
            self._announce(state, tid)
        try:
            key = _get(a, "key", str)
            grad = a.get("grad")
            grad_ref = await self._resolve(grad, "gradient") if grad is not None else None
            refs = self.engine.backward_merged(key, grad_ref)
            if len(refs) != len(ids):
                raise WorkerError(f"worker {self.name!r}: segment {key!r} merged {len(refs)} sources, but "
                                  f"{len(ids)} gradient ids were given")
            for tid, ref in zip(ids, refs):
                self._export(tid, ref)
        except Exception as exc:
            for tid in ids:
                self._fail_export(tid, exc)
            raise
        return {}, []

    async def _op_export_state(self, a, blobs, *, state: _SessionState, **_):
        """Snapshot segment ``key``'s weights (safetensors) as tensor ``id``, for one peer to pull.

        Nothing is recorded here: the receiver records the transfer (``load_state``).
        """
        tid = _get(a, "id", int)
        self._announce(state, tid)
        try:
            module = self.engine._segment(_get(a, "key", str)).module
            blob = encode_state({k: v.detach() for k, v in module.state_dict().items()})
            payload = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            self._export(tid, self.engine._keep(payload, "weights"))
        except Exception as exc:
            self._fail_export(tid, exc)
            raise
        return {}, []

    async def _op_load_state(self, a, blobs, **_):
        """Load weights another party exported (``export_state``) into segment ``key``, pulling them over
        the peer stream; recorded as ``weights`` bytes on the link owner -> this worker."""
        key = _get(a, "key", str)
        src = _ref(_get(a, "src", dict))
        if src.owner == self.name:
            payload = self.engine._take(self._local(src).id)
        else:
            payload = await (await self._link(src.owner)).pull(src.id, "weights")
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise WireError(f"worker {self.name!r}: weights from {src.owner!r} must be a 1-D uint8 payload")
        state = decode_state(payload.numpy().tobytes(), max_bytes=self.limits.max_blob_bytes)
        try:
            self.engine.set_state(key, state, src=src.owner)  # records owner -> self (not when local)
        except RuntimeError as exc:  # load_state_dict: names or shapes do not fit the segment
            raise WireError(f"worker {self.name!r}: weights from {src.owner!r} do not fit segment {key!r}: "
                            f"{exc}") from None
        return {}, []

    async def _op_get_grads(self, a, blobs, **_):
        grads = self.engine.get_grads(_get(a, "key", str))
        return {"keys": list(grads)}, [encode_state(grads)]

    async def _op_run_epoch(self, a, blobs, **_):
        raise WireError("run_epoch runs only as a command of its own on a Session stream")

    async def _op_zero_grad(self, a, blobs, **_):
        self.engine.zero_grad(_get(a, "key", str))
        return {}, []

    async def _op_step(self, a, blobs, **_):
        self.engine.step(_get(a, "key", str))
        return {}, []

    async def _op_fetch(self, a, blobs, **_):
        ref = _ref(_get(a, "ref", dict))
        if ref.owner != self.name:
            raise WorkerError(f"worker {self.name!r} holds no tensor of {ref.owner!r}")
        fut = self._exports.get(ref.id)
        if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
            raise WorkerError(f"worker {self.name!r} holds no tensor #{ref.id}")
        tensor = self.engine.fetch(TensorRef(self.name, fut.result()), kind=_get(a, "kind", str))  # policy check
        self._exports.pop(ref.id, None)
        return {}, [encode_tensor(tensor)]

    async def _op_get_state(self, a, blobs, **_):
        state = self.engine.get_state(_get(a, "key", str))
        return {"keys": list(state)}, [encode_state(state)]  # keys: safetensors does not keep the order

    async def _op_set_state(self, a, blobs, *, caller: str, **_):
        state = decode_state(_blob(blobs, 0, "state"), max_bytes=self.limits.max_blob_bytes)
        self.engine.set_state(_get(a, "key", str), state, src=caller)
        return {}, []

    async def _op_fetch_segment(self, a, blobs, **_):
        module = self.engine.fetch_segment(_get(a, "key", str))
        return {}, [spec_to_json(module_to_spec(module)).encode(), encode_state(module.state_dict())]

    async def _op_release(self, a, blobs, **_):
        self.engine.release()
        for fut in self._exports.values():
            if not fut.done():
                fut.cancel()
        self._exports.clear()
        return {}, []


# --------------------------------------------------------------------------------- running
@dataclass
class ServeConfig:
    """How ``splitnn worker`` runs a :class:`WorkerServer`."""

    name: str
    listen: str
    token: str
    tls: TLSConfig | None = None
    limits: Limits = field(default_factory=Limits)
    peer_timeout: float = 60.0
    release_outputs: bool = False
    address_file: str | None = None
    max_lifetime: float | None = None
    datasets: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


async def serve(config: ServeConfig, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Run a worker until SIGINT/SIGTERM (or ``max_lifetime`` seconds); shut down gracefully."""
    import os
    import signal

    server = WorkerServer(config.name, config.token, tls=config.tls, limits=config.limits,
                          peer_timeout=config.peer_timeout, policy=WorkerPolicy(release_outputs=config.release_outputs))
    for dname, parts in config.datasets.items():
        server.engine.add_dataset(dname, **parts)
    address = await server.start(config.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if config.address_file:
        tmp = f"{config.address_file}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(address + "\n")
        os.replace(tmp, config.address_file)  # atomic: a reader never sees half an address
    if on_ready is not None:
        on_ready(address)
    try:
        await asyncio.wait_for(stop.wait(), config.max_lifetime)
    except asyncio.TimeoutError:
        log.warning("worker %s: max lifetime reached, shutting down", config.name)
    await server.stop(grace=1.0)
