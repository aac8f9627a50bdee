"""Sessions: each researcher's job at a worker owns what it creates, and is freed when it ends.

:class:`Session` is one job (what it owns); :class:`Sessions` issues and checks their ids, holds
them per researcher identity within limits, and frees them (the grace period).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping

import torch

from splitnn.common.messages import check_session_id, new_session_id, session_tag
from splitnn.errors import PolicyError, WorkerError
from splitnn.server.exports import Exports
from splitnn.server.peers import Peers, SessionPeers
from splitnn.server.replay import Replay
from splitnn.server.shipped import Inbox
from splitnn.transport.counters import ByteCounters
from splitnn.transport.memory import release_memory
from splitnn.workers.audit import AuditLog
from splitnn.workers.held import HeldData
from splitnn.workers.virtual import VirtualWorker, WorkerPolicy

log = logging.getLogger("splitnn.worker")

#: Seconds a closed session's segments and datasets are kept for the researcher to resume.
DEFAULT_GRACE = 300.0
#: Sessions (open, or closed within their grace period) a worker keeps at once.
DEFAULT_MAX_SESSIONS = 64
#: Sessions of one researcher identity (token or certificate) a worker keeps at once.
DEFAULT_MAX_SESSIONS_PER_RESEARCHER = 16
#: Seconds a session issued by ``hello`` is kept for its researcher's first stream, when it holds nothing yet.
ISSUED_WAIT = 60.0

OWNER_RULE = "a session may only use, replace or remove the segments and datasets it created itself"


class TooManySessions(WorkerError):
    """Every session slot of the worker, or of the caller's researcher identity, is in use (``splitnn worker
    --max-sessions``, ``--max-sessions-per-researcher``)."""


class UnknownSession(WorkerError):
    """A call names a session id the worker did not issue, or whose session has ended."""


class Session:
    """One researcher's job at this worker (:class:`Sessions` says how it is issued and freed).

    ``commands`` and ``executor`` are set by the server (:class:`~splitnn.server.server.WorkerServer`).

    What a session owns. Everything it creates lives in a :class:`Session` of its own: an
    engine (a :class:`~splitnn.workers.VirtualWorker` holding its segments, their optimizers,
    the datasets it placed, its intermediate tensors and pending losses, its ledger), the
    tensors it promised to its peers (:class:`~splitnn.server.exports.Exports`), the pushes
    of its shipped epochs (:class:`~splitnn.server.shipped.Inbox`), its peers and their
    session tags (:class:`~splitnn.server.peers.SessionPeers`) and its wire counters. Nothing
    is shared between sessions but the datasets the party loaded itself (``splitnn worker
    --data``): every session reads them, none may replace them. Two sessions may even hold a
    segment or dataset under the same name, each its own. :class:`Sessions` also keeps which
    sessions hold which segment keys and dataset names, so a session naming one that only
    others hold gets a :class:`~splitnn.errors.PolicyError` stating the rule (it cannot use,
    replace or remove another session's) instead of a misleading "not found".
    """

    def __init__(
        self,
        name: str,
        session_id: str,
        *,
        anonymous: bool,
        peers: Peers,
        owner: str = "",
        timeout: float,
        party: Mapping[str, HeldData],
        policy: WorkerPolicy | None,
        device: torch.device | str = "cpu",
        state_dir: str | os.PathLike | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.id = session_id
        self.tag = session_tag(session_id)
        self.anonymous = anonymous
        self.owner = owner  # the researcher identity that opened it (only it may resume it)
        self.fresh = False  # issued by hello, not yet opened by a stream: kept ISSUED_WAIT s though it holds nothing
        self.engine = VirtualWorker(name, fuse=False, policy=policy, device=device, state_dir=state_dir, audit=audit)
        self.engine.audit_session = self.tag[:16]  # the public tag, never the id
        self.engine.own_datasets = frozenset(party)  # what the policy's `datasets` rule guards
        self._party = party  # the party's own datasets (name -> data), shared read-only
        self.engine.hold(party)
        self.counters = ByteCounters()
        self._audited: dict[tuple[str, str], tuple[int, int]] = {}  # sent bytes already in the audit log
        self.installed = False  # it hosted a segment: its traffic and end go to the audit log
        self.exports = Exports(name, self.engine, timeout)
        self.inbox = Inbox(name, timeout)
        self.peers = SessionPeers(peers, self)
        self.streams = 0  # open streams and calls of this session
        self.ended = False  # the researcher said it is done: free everything when it closes
        self.closed_at: float | None = None
        self.expiry: asyncio.TimerHandle | None = None
        self.commands = None
        self.executor = None
        # the researcher's streams by their ids (splitnn.server.replay): each holds one place in `streams`
        # from its first command until it ends or, broken and not resumed, its grace period ends
        self.replays: dict[str, Replay] = {}

    def __repr__(self) -> str:
        return f"Session({self.tag[:8]}, streams={self.streams}, segments={len(self.engine.segment_keys())})"

    def holds_state(self) -> bool:
        """Whether the session holds something worth resuming (segments, datasets it placed or aligned by PSI)."""
        return bool(self.engine.segment_keys()) or any(
            held is not self._party.get(name) for name, held in self.engine.datasets().items()
        )

    async def serve(self, peer: str, tensor_id: int, kind: str) -> tuple[object, bool]:
        """Hand ``peer`` this session's tensor ``tensor_id`` (a pull over a peer stream of this session), and
        whether ``peer`` pulled it before (a pull repeated after a broken link)."""
        if peer not in self.peers.addresses:
            raise PolicyError(
                f"worker {self.engine.name!r} hands a session's tensors only to the peers of its model "
                f"({sorted(self.peers.addresses)}), not to {peer!r}"
            )
        if kind == "psi":
            self.engine.check_psi_peer(peer)  # the party's policy: `psi_peers` (by default `peers`)
        else:
            self.engine.check_receiver(peer, f"its {kind}")  # the party's policy: `peers`, or the model's adjacency
        return await self.exports.take(tensor_id, kind, peer)

    def audit_sent(self) -> None:
        """Write to the audit log what this session sent since the last time, per receiver and kind
        (serialized bytes on the wire: to peers and to the researcher)."""
        audit = self.engine.audit
        if audit is None or not self.installed:
            return
        for t in self.counters.totals():
            if t.direction != "sent":
                continue
            m0, b0 = self._audited.get((t.peer, t.kind), (0, 0))
            if t.nbytes != b0:
                audit.write(
                    "sent",
                    session=self.engine.audit_session,
                    to=t.peer,
                    kind=t.kind,
                    bytes=t.nbytes - b0,
                    count=t.messages - m0,
                )
                self._audited[(t.peer, t.kind)] = (t.messages, t.nbytes)

    def free_tensors(self, reason: str) -> None:
        """Free the intermediate tensors: stored activations and gradients, promised exports, pushes, losses."""
        self.engine.release()
        self.exports.fail_all(reason)
        self.inbox.clear()
        for box in self.peers.outboxes.values():  # pushes kept for a re-send
            box.clear()

    def stop_replays(self) -> None:
        """Stop every stream's commands (the session is being dropped)."""
        for replay in self.replays.values():
            if replay.expiry is not None:
                replay.expiry.cancel()
                replay.expiry = None
            if replay.runner is not None and not replay.runner.done():
                replay.runner.cancel()
        self.replays.clear()

    def free_all(self) -> None:
        """Free everything the session holds: its tensors, segments, optimizers and placed datasets."""
        self.free_tensors("the researcher's session ended")
        self.engine.clear()
        self.engine.hold(self._party)


class Sessions:
    """The sessions of one worker, what each owns, and their lifecycle.

    A worker is often a long-running service that several researchers (or several jobs of one
    researcher) use at once. A *session* is one such job at this worker. The worker chooses its id:
    a researcher's client asks for a new session in its ``hello`` call (``x-splitnn-new-session``) and
    gets a random id (128 bits, :func:`~splitnn.common.messages.new_session_id`) back, which it sends
    with every later call (``x-splitnn-session``). The id is a secret: whoever presents it acts as
    that session. A call naming an id the worker did not issue, or whose session has ended, is
    refused (:class:`UnknownSession`): a client cannot pick an id (nor guess one), and an id
    names a session only while the worker holds it. Calls without one get an anonymous session of
    their own, freed when they end.

    Who holds it. Each session belongs to the researcher identity that opened it (``owner``): the
    fingerprint of the caller's certificate under mutual TLS, else the token it presented (every
    holder of the federation token is one identity; a worker started with
    ``--researcher-tokens`` tells its researchers apart by their own tokens). Only that identity
    may resume it. A worker keeps at most ``max_sessions`` sessions, and at most
    ``max_per_researcher`` of one identity, so one researcher cannot take every slot and lock the
    others out: a new session first evicts its own researcher's oldest closed one, then anyone's,
    and is refused (:class:`TooManySessions`, naming the limit) when those are all in use.

    When it is freed. When the last stream of a session ends (the researcher closed it; or it
    broke and was not resumed within the grace period, :mod:`splitnn.server.replay`), its
    intermediate tensors (stored activations and gradients, promised exports, pushes received or kept, pending
    losses) are freed at once and its peer streams closed. Its
    segments, optimizers and placed datasets are kept for a grace period
    (``splitnn worker --session-grace``, :data:`DEFAULT_GRACE` seconds), so a researcher who
    reconnects with the same session id resumes where it stood; after it they are freed too.
    A session that holds no segment or dataset, an anonymous one, and one whose researcher
    ended it (``end_session``) are freed at once; a session just issued is kept
    :data:`ISSUED_WAIT` seconds for its researcher's stream to open it.

    Args:
        name: the worker's party name.
        peers: the worker's peer links (each session gets its own view of them).
        timeout: seconds a peer's pull or push is awaited.
        setup: called with every new session (the server gives it its commands and executor).
        policy: what each session's engine hands to the researcher.
        grace: seconds a closed session's segments and datasets are kept (0: freed at once).
        max_sessions: sessions kept at once.
        max_per_researcher: sessions of one researcher identity kept at once.
        device: where every session's engine keeps its segments, optimizer state and data, and
            computes (``splitnn worker --device``); the party's own datasets are held there too.
    """

    def __init__(
        self,
        name: str,
        *,
        peers: Peers,
        timeout: float,
        setup: Callable[[Session], None],
        grace: float = DEFAULT_GRACE,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_per_researcher: int = DEFAULT_MAX_SESSIONS_PER_RESEARCHER,
        policy: WorkerPolicy | None = None,
        device: torch.device | str = "cpu",
        state_dir: str | os.PathLike | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.name, self.peers, self.timeout, self._setup = name, peers, timeout, setup
        self.policy = policy
        self.state_dir, self.audit = state_dir, audit
        self.grace, self.max_sessions, self.max_per_researcher = grace, max_sessions, max_per_researcher
        self._by_id: dict[str, Session] = {}
        self._by_tag: dict[str, Session] = {}
        # segment key / dataset name -> tags of the sessions holding one under that name (each its own)
        self._segment_owners: dict[str, set[str]] = {}
        self._dataset_owners: dict[str, set[str]] = {}
        # the datasets the party loaded itself (shared, read-only), on its device
        self._party = VirtualWorker(name, device=device)
        self.device = self._party.device

    # -- the party's own datasets ---------------------------------------------------------------
    def add_party_dataset(self, name: str, **parts: object) -> None:
        """Hold a dataset the party loaded itself (``--data``; ``parts``: ``features``, ``labels``, ``ids``
        as :meth:`VirtualWorker.add_dataset` takes them): every session reads it, none may replace it."""
        self._party.add_dataset(name, **parts)

    def party_datasets(self) -> list[str]:
        return sorted(self._party.datasets())

    # -- lifecycle --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, session_id: str) -> Session | None:
        return self._by_id.get(session_id)

    def resolve(self, tag: str | None) -> Session | None:
        """The session a peer stream's tag names (None: none)."""
        return self._by_tag.get(tag) if tag is not None else None

    def open(self, session_id: str | None, owner: str = "", *, issue: bool = False) -> Session:
        """Resume session ``session_id`` (one this worker issued, still held, opened by ``owner``); or, for ``None``,
        issue a new session to ``owner`` (``issue``) or open an anonymous one; count one more stream.

        Raises :class:`UnknownSession` for an id the worker does not hold, PolicyError for another researcher's
        session, :class:`TooManySessions` when no slot can be freed for a new one.
        """
        if session_id is not None:
            check_session_id(session_id)
            session = self._by_id.get(session_id)
            if session is None:
                raise UnknownSession(
                    f"worker {self.name!r} holds no session with this id: it ended, expired (--session-grace) or the "
                    "worker restarted, or it was never issued (session ids are issued by the worker); connect "
                    "without a session id for a new one"
                )
            if session.owner != owner:
                raise PolicyError(
                    f"worker {self.name!r}: this session belongs to another researcher; a session is resumed only "
                    "by the researcher identity (token or certificate) that opened it"
                )
            if session.expiry is not None:
                session.expiry.cancel()
                session.expiry = None
                if not session.fresh:
                    log.info("worker %s: session %s resumed", self.name, session.tag[:8])
            session.fresh = False
            session.streams += 1
            session.closed_at = None
            return session
        self._make_room(owner)
        session = Session(
            self.name,
            new_session_id(),
            anonymous=not issue,
            owner=owner,
            peers=self.peers,
            timeout=self.timeout,
            party=self._party.datasets(),
            policy=self.policy,
            state_dir=self.state_dir,
            audit=self.audit,
            device=self.device,
        )
        session.fresh = issue
        session.engine.psi_runs = self._party.psi_runs  # max_psi_runs counts over the worker's life, not per session
        self._setup(session)
        self._by_id[session.id] = session
        self._by_tag[session.tag] = session
        session.streams = 1
        return session

    def owned_by(self, owner: str) -> list[Session]:
        """The sessions researcher identity ``owner`` holds here."""
        return [s for s in self._by_id.values() if s.owner == owner]

    def _make_room(self, owner: str) -> None:
        """Make room for a new session of ``owner``: within its own limit, then the worker's (evicting closed ones)."""
        mine = self.owned_by(owner)
        if len(mine) >= self.max_per_researcher and not self._evict_one(mine):
            raise TooManySessions(
                f"worker {self.name!r}: this researcher holds {len(mine)} sessions here already, the limit per "
                f"researcher (splitnn worker --max-sessions-per-researcher); close or end one first"
            )
        if len(self._by_id) >= self.max_sessions and not self._evict_one(list(self._by_id.values())):
            raise TooManySessions(
                f"worker {self.name!r} serves {len(self._by_id)} sessions already, its limit "
                f"(splitnn worker --max-sessions); try again when one ends"
            )

    def close(self, session: Session) -> None:
        """One stream of ``session`` ended; when it was the last, free its tensors and start its grace period."""
        session.streams -= 1
        if session.streams > 0 or self._by_id.get(session.id) is not session:
            return
        held = session.engine.holds_tensors() or session.holds_state()
        if held:
            session.audit_sent()
        session.free_tensors("the researcher's session ended")
        self.peers.close_scope(session.tag)
        session.closed_at = time.monotonic()
        if session.fresh and not session.ended:  # issued, its researcher's stream not there yet
            session.expiry = asyncio.get_running_loop().call_later(ISSUED_WAIT, self._expire, session)
        elif session.anonymous or session.ended or self.grace <= 0 or not session.holds_state():
            self.drop(session)
        else:
            session.expiry = asyncio.get_running_loop().call_later(self.grace, self._expire, session)
        if held:  # (not after every one-off call that held nothing)
            release_memory()

    def end(self, session: Session) -> None:
        """The researcher is done with ``session``: free everything it owns now (it is dropped when it closes)."""
        session.ended = True
        session.audit_sent()
        self._forget_owned(session)
        session.free_all()

    def _expire(self, session: Session) -> None:
        session.expiry = None
        if session.streams == 0 and self._by_id.get(session.id) is session:
            log.info("worker %s: session %s expired; freed", self.name, session.tag[:8])
            self.drop(session)
            release_memory()

    def drop(self, session: Session) -> None:
        """Forget ``session`` and free everything it owns."""
        if self.audit is not None and session.installed:
            session.audit_sent()
            self.audit.write("session_end", session=session.engine.audit_session)
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        if self._by_id.get(session.id) is session:
            del self._by_id[session.id]
            del self._by_tag[session.tag]
        self._forget_owned(session)
        session.stop_replays()
        session.free_all()
        self.peers.close_scope(session.tag)

    def _evict_one(self, among: list[Session]) -> bool:
        """Drop the session of ``among`` closed longest ago to make room; False if every one is open."""
        closed = [s for s in among if s.streams == 0 and s.closed_at is not None]
        if not closed:
            return False
        oldest = min(closed, key=lambda s: s.closed_at)
        log.warning(
            "worker %s: session %s freed before its grace period ended (session limit)", self.name, oldest.tag[:8]
        )
        self.drop(oldest)
        return True

    def drop_all(self) -> None:
        for session in list(self._by_id.values()):
            self.drop(session)

    def _forget_owned(self, session: Session) -> None:
        for index in (self._segment_owners, self._dataset_owners):
            for name in [n for n, tags in index.items() if session.tag in tags]:
                _discard(index, name, session.tag)

    # -- ownership ----------------------------------------------------------------------------------
    def _refuse(self, what: str, name: str) -> PolicyError:
        return PolicyError(
            f"worker {self.name!r}: {what} {name!r} belongs to another session, not this one; {OWNER_RULE}"
        )

    # Each session has its own engine, so two sessions may each hold a segment (or dataset) under one
    # name without touching each other's; the index only serves to tell a session that names one it
    # does not hold, but another does, why it may not (rather than a misleading "not found").
    def check_segment(self, session: Session, key: str) -> str:
        """``key`` if ``session`` may use segment ``key``: PolicyError when only other sessions hold one."""
        tags = self._segment_owners.get(key)
        if tags and session.tag not in tags:
            raise self._refuse("segment", key)
        return key

    def claim_segment(self, session: Session, key: str) -> None:
        """Record that ``session`` hosts a segment ``key`` (after a successful add)."""
        self._segment_owners.setdefault(key, set()).add(session.tag)

    def release_segment(self, session: Session, key: str) -> None:
        _discard(self._segment_owners, key, session.tag)

    def check_dataset(self, session: Session, name: str) -> str:
        """``name`` if ``session`` may read dataset ``name``: PolicyError when only other sessions hold one."""
        tags = self._dataset_owners.get(name)
        if tags and session.tag not in tags and name not in self._party.datasets():
            raise self._refuse("dataset", name)
        return name

    def check_placing(self, name: str) -> str:
        """``name`` if a session may place a dataset under it: not a name of the party's own datasets."""
        if name in self._party.datasets():
            raise PolicyError(
                f"worker {self.name!r}: dataset {name!r} is the party's own (loaded with --data); every session "
                f"may read it, none may replace it; place yours under another name"
            )
        return name

    def claim_dataset(self, session: Session, name: str) -> None:
        self._dataset_owners.setdefault(name, set()).add(session.tag)


def _discard(index: dict[str, set[str]], name: str, tag: str) -> None:
    tags = index.get(name)
    if tags is not None:
        tags.discard(tag)
        if not tags:
            del index[name]
