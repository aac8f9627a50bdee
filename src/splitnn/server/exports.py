"""What a session has promised to produce, by the researcher's tensor id, and what one stream holds.

:class:`Exports` maps the researcher's ids to the engine's tensors (its docstring says how pulls wait,
and how long a pulled tensor is kept); :class:`StreamState` is what one stream of the session holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from splitnn.errors import WireError, WorkerError
from splitnn.wire.cut_codec import Encoded
from splitnn.wire.tensor_codec import tensor_nbytes
from splitnn.workers.refs import TensorRef
from splitnn.workers.virtual import VirtualWorker

#: Announced ids a session remembers before it prunes those already consumed.
PRUNE_ANNOUNCED = 4096
#: Kinds of stored tensors that a peer may pull only by naming that kind (and a pull of that kind gets no other).
PULLED_ONLY_AS_ITSELF = ("weights", "psi")
#: Tensors handed to a peer that a session keeps, for that peer to pull again after a broken link.
SERVED_KEEP = 64
#: ... and at most this many bytes of them.
SERVED_KEEP_BYTES = 64 * 1024 * 1024


@dataclass
class StreamState:
    """One stream's staged uploads and announced tensor ids.

    :class:`StreamState` is what one of the session's streams (or one unary call) holds
    beyond that: the ids it announced (dropped when the stream ends) and big uploads it
    sent in chunks (``stage`` commands) before the command that uses them.
    """

    staged: dict[int, bytearray] = field(default_factory=dict)
    staged_bytes: int = 0
    exports: set[int] = field(default_factory=set)  # tensor ids this stream announced (dropped at its end)

    def stage(self, sid: int, chunk: bytes, max_bytes: int) -> None:
        """Append one chunk to staged upload ``sid``; all uploads together stay within ``max_bytes``."""
        if self.staged_bytes + len(chunk) > max_bytes:
            self.staged.clear()
            self.staged_bytes = 0
            raise WireError(f"staged uploads exceed the {max_bytes}-byte limit")
        self.staged.setdefault(sid, bytearray()).extend(chunk)
        self.staged_bytes += len(chunk)

    def unstage(self, args: dict, blobs: list[bytes]) -> list[bytes]:
        """Put the staged uploads a command names (``args["_staged"]``: blob index -> upload id) in its blobs."""
        staged = args.get("_staged")
        if not staged:
            return blobs
        if not isinstance(staged, dict):
            raise WireError("'_staged' must map blob indices to staged upload ids")
        for index, sid in staged.items():
            if not (isinstance(index, str) and index.isdigit() and int(index) < len(blobs) and isinstance(sid, int)):
                raise WireError("'_staged' names a blob that does not exist")
            buf = self.staged.pop(sid, None)
            if buf is None:
                raise WireError(f"no staged upload #{sid}")
            self.staged_bytes -= len(buf)
            blobs[int(index)] = bytes(buf)
        return blobs


def quiet_future() -> asyncio.Future:
    """A future on the running loop whose exception is never reported as "never retrieved"."""
    fut = asyncio.get_running_loop().create_future()
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


class Exports:
    """The tensors this worker produced (or will produce), by the researcher's id.

    The researcher chooses the ids of the tensors its commands will produce (so it can
    pipeline a whole training step without waiting). :class:`Exports` maps each such id to
    a future that resolves to the engine's own tensor id once the command that produces
    it has run -- or fails with the reason it could not. A peer that pulls tensor #7 before
    it exists simply awaits that future; a command of this worker that consumes #7
    takes it directly. Either way a tensor is handed out once; a tensor a peer pulled is kept a
    little longer (the last :data:`SERVED_KEEP` of them, within :data:`SERVED_KEEP_BYTES`) so that
    the same peer can pull it again when the link broke before the tensor reached it -- a pull is
    idempotent by id -- and then forgotten. Each session (:mod:`splitnn.server.sessions`) has its
    own :class:`Exports`, over its own engine.
    """

    def __init__(self, name: str, engine: VirtualWorker, timeout: float) -> None:
        self.name, self.engine, self.timeout = name, engine, timeout
        self._futures: dict[int, asyncio.Future] = {}
        # values handed out to a peer, by id: (peer, kind, value), oldest first (see the class docstring)
        self._served: OrderedDict[int, tuple[str, str, object]] = OrderedDict()
        self._served_bytes = 0

    # -- sessions ---------------------------------------------------------------------------
    def announce(self, state: StreamState, tid: int) -> None:
        """Remember that this stream announced tensor id ``tid`` (pruned of consumed ids now and then)."""
        state.exports.add(tid)
        if len(state.exports) > PRUNE_ANNOUNCED:
            state.exports &= self._futures.keys()

    def drop_stream(self, state: StreamState) -> None:
        """Forget the tensor ids a finished stream announced (a later stream may reuse them)."""
        for tid in state.exports:
            fut = self._futures.pop(tid, None)
            if fut is not None and not fut.done():
                fut.cancel()
        state.exports.clear()

    @contextlib.contextmanager
    def producing(self, state: StreamState, *tids: int | None) -> Iterator[None]:
        """Announce ``tids`` for a command that produces them; if it fails, fail them (their pullers learn why)."""
        for tid in tids:
            if tid is not None:
                self.announce(state, tid)
        try:
            yield
        except Exception as exc:
            for tid in tids:
                self.fail(tid, exc)
            raise

    # -- producing --------------------------------------------------------------------------
    def _future(self, tid: int) -> asyncio.Future:
        fut = self._futures.get(tid)
        if fut is None:
            fut = self._futures[tid] = quiet_future()
        return fut

    def export(self, tid: int | None, ref: TensorRef | None) -> None:
        """Publish the engine's tensor ``ref`` as ``tid`` (no ``tid``: nobody will ask, drop it)."""
        if tid is None:
            if ref is not None:  # nobody will ask for it
                self.engine.take(ref.id)
            return
        if ref is None:
            raise WorkerError(f"worker {self.name!r}: expected to produce tensor #{tid} but produced nothing")
        fut = self._future(tid)
        if fut.done():
            raise WireError(f"worker {self.name!r}: tensor id #{tid} is already in use")
        fut.set_result(ref.id)

    def fail(self, tid: int | None, exc: BaseException) -> None:
        """Tensor ``tid`` will not come: whoever waits for it gets a WorkerError saying why."""
        if tid is None:
            return
        fut = self._future(tid)
        if not fut.done():
            fut.set_exception(WorkerError(f"worker {self.name!r} could not produce tensor #{tid}: {exc}"))

    def cancel_all(self) -> None:
        """Forget every export (``release``); pending waits are cancelled."""
        for fut in self._futures.values():
            if not fut.done():
                fut.cancel()
        self._futures.clear()
        self._forget_served()

    def fail_all(self, reason: str) -> None:
        """Forget every export; a peer still waiting for one gets a WorkerError saying ``reason``."""
        for tid, fut in self._futures.items():
            if not fut.done():
                fut.set_exception(WorkerError(f"worker {self.name!r} will not produce tensor #{tid}: {reason}"))
        self._futures.clear()
        self._forget_served()

    def _forget_served(self) -> None:
        self._served.clear()
        self._served_bytes = 0

    # -- consuming --------------------------------------------------------------------------
    def local(self, ref: TensorRef) -> TensorRef:
        """Consume export ``ref.id`` here: the engine ref it stands for (it must have been produced)."""
        fut = self._futures.pop(ref.id, None)
        if fut is None or not fut.done() or fut.cancelled():
            raise WorkerError(f"worker {self.name!r} holds no tensor #{ref.id} (already consumed or released)")
        if fut.exception() is not None:
            raise fut.exception()
        return TensorRef(self.name, fut.result())

    def produced(self, tid: int) -> TensorRef:
        """The engine ref of export ``tid`` if it was produced successfully (not consumed: see :meth:`forget`)."""
        fut = self._futures.get(tid)
        if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
            raise WorkerError(f"worker {self.name!r} holds no tensor #{tid}")
        return TensorRef(self.name, fut.result())

    def forget(self, tid: int) -> None:
        self._futures.pop(tid, None)

    async def take(self, tid: int, kind: str, peer: str) -> tuple[object, bool]:
        """Wait (up to the timeout) for export ``tid`` and hand out its value (a tensor, a tuple, or an encoded
        value), for ``peer``'s pull; and whether it is a repeat: ``peer`` pulled it before (its link broke)."""
        again = self._again(tid, kind, peer)
        if again is not None:
            return again, True
        fut = self._future(tid)
        try:
            engine_id = await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except asyncio.TimeoutError:
            raise WorkerError(f"worker {self.name!r} did not produce tensor #{tid} within {self.timeout:g} s") from None
        again = self._again(tid, kind, peer)  # a pull of the same tensor, on a newer link, got it meanwhile
        if again is not None:
            return again, True
        self._futures.pop(tid, None)
        stored = self.engine.stored_kind(engine_id)
        # weights and PSI messages go out only to a pull of their own kind, and such a pull gets nothing else
        if stored is not None and any((stored == k) != (kind == k) for k in PULLED_ONLY_AS_ITSELF):
            raise WorkerError(f"worker {self.name!r}: tensor #{tid} is not a {kind}")
        tensor = self.engine.take(engine_id)  # PolicyError for raw features / labels
        self._keep_served(tid, peer, kind, tensor)
        return tensor, False

    def _again(self, tid: int, kind: str, peer: str) -> object | None:
        served = self._served.get(tid)
        if served is None:
            return None
        if served[:2] != (peer, kind):
            raise WorkerError(f"worker {self.name!r}: tensor #{tid} was handed out already")
        return served[2]

    def _keep_served(self, tid: int, peer: str, kind: str, value: object) -> None:
        value = without_graph(value)  # a re-pull needs the bytes; the graph would keep the step's activations alive
        self._served[tid] = (peer, kind, value)
        self._served_bytes += held_bytes(value)
        while self._served and (len(self._served) > SERVED_KEEP or self._served_bytes > SERVED_KEEP_BYTES):
            _, (_, _, old) = self._served.popitem(last=False)
            self._served_bytes -= held_bytes(old)


def held_bytes(value: object) -> int:
    """Bytes a value kept for a peer holds (what keeping it costs): a tensor, bytes, an encoded value (its entries),
    a tuple or list of those; anything else counts 0."""
    if isinstance(value, torch.Tensor):
        return tensor_nbytes(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, Encoded):
        value = value.entries
    if isinstance(value, (tuple, list)):
        total = 0
        for v in value:  # (a loop, not a generator: this runs for every push, at both ends)
            total += tensor_nbytes(v) if isinstance(v, torch.Tensor) else held_bytes(v)
        return total
    return 0


def without_graph(value: object) -> object:
    """``value`` with every tensor detached from its autograd graph (the same storage; tuples and lists kept)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(without_graph(v) for v in value)
    return value
