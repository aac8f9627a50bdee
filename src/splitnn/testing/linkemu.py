"""A userspace link emulator: TCP proxies that add one-way delay and cap bandwidth.

:class:`LinkEmulator` (asyncio) and :class:`ThreadedLinkEmulator` (the same, on its own event loop thread,
for synchronous code) give each party a listening address that forwards to its worker; the class
docstring says what is modelled. From a shell: ``python -m splitnn.testing.linkemu --delay 10ms
LISTEN=TARGET ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import socket
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from splitnn.errors import ConfigurationError
from splitnn.transport.addresses import split_host_port

__all__ = [
    "LinkProfile",
    "LinkEmulator",
    "ThreadedLinkEmulator",
    "parse_rate",
    "parse_delay",
    "measure_rtt",
    "measure_rate",
]

#: Most bytes read from a socket at a time (and the unit the rate is charged in).
READ_BYTES = 64 * 1024
#: With a rate cap, a read holds at most this many seconds of the link's time: a chunk is released
#: only once all of it has been "serialised", so big chunks on a slow link would add latency.
RATE_QUANTUM = 0.0005
#: Bytes a direction of one connection may hold before the proxy stops reading (unlimited rate).
MAX_BUFFERED = 64 * 1024 * 1024

_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(bit|kbit|mbit|gbit)\s*$", re.IGNORECASE)
_DELAY = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|ms|us)?\s*$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}  # bytes per second
_DELAY_UNITS = {None: 1e-3, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def _quantity(text: str | float, pattern: re.Pattern[str], units: dict, what: str, examples: str) -> float:
    """A number as it is, or ``text`` read by ``pattern`` as a number and a unit of ``units`` (its factor)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    m = pattern.match(str(text))
    if m is None:
        raise ConfigurationError(f"cannot read {what} {text!r}; write e.g. {examples}")
    return float(m.group(1)) * units[m.group(2).lower() if m.group(2) else None]


def parse_rate(text: str | float | None) -> float | None:
    """``"10mbit"`` -> bytes per second (1.25e6); a number is taken as bytes/s; None or "" means unlimited.

    Units as ``tc``: ``bit``, ``kbit``, ``mbit``, ``gbit`` (powers of 1000, bits per second).
    """
    if text is None or text == "":
        return None
    value = _quantity(text, _RATE, _RATE_UNITS, "rate", "10mbit, 100mbit or 1gbit")
    if not value > 0:
        raise ConfigurationError(f"a rate must be positive, got {text!r}")
    return value


def parse_delay(text: str | float) -> float:
    """``"10ms"`` -> 0.010 seconds (a bare number in a string is milliseconds; a float is seconds)."""
    value = _quantity(text, _DELAY, _DELAY_UNITS, "delay", "10ms, 0.5ms or 1s")
    if not 0 <= value < 3600:
        raise ConfigurationError(f"a delay must be 0 or more seconds (and under an hour), got {text!r}")
    return value


def _split(address: str) -> tuple[str, int]:
    host, port = split_host_port(address, "an address", any_port=True, host_optional=True)
    return host or "127.0.0.1", port


@dataclass
class LinkProfile:
    """The settings of one emulated link: one-way ``delay`` (seconds) and ``rate`` (bytes/s, None: unlimited).

    Changing them takes effect for bytes read from then on.
    """

    delay: float = 0.0
    rate: float | None = None

    def __post_init__(self) -> None:
        self.delay = parse_delay(self.delay)
        self.rate = parse_rate(self.rate)


@dataclass
class _Direction:
    """One direction of a link: the shared serialisation queue, kept as the time the link is next free."""

    profile: LinkProfile
    free_at: float = 0.0

    def deliver_at(self, nbytes: int, now: float) -> float:
        rate = self.profile.rate
        done = now
        if rate:
            done = self.free_at = max(now, self.free_at) + nbytes / rate
        return done + self.profile.delay

    def read_size(self) -> int:
        rate = self.profile.rate
        return READ_BYTES if not rate else max(1024, min(READ_BYTES, int(rate * RATE_QUANTUM)))

    def buffer_cap(self) -> int:
        rate = self.profile.rate
        if not rate:
            return MAX_BUFFERED
        return max(1 << 20, int(2 * rate * max(self.profile.delay, 0.05)))  # about a router's queue


@dataclass
class _Proxy:
    name: str
    target: tuple[str, int]
    profile: LinkProfile
    listener: socket.socket | None = None
    address: str = ""
    connections: set = field(default_factory=set)  # the writers of both ends of every open connection
    to_worker: _Direction = field(init=False)
    from_worker: _Direction = field(init=False)

    def __post_init__(self) -> None:
        self.to_worker = _Direction(self.profile)
        self.from_worker = _Direction(self.profile)


class LinkEmulator:
    """Delay/rate proxies on one event loop. Use ``async with`` or call :meth:`aclose`.

    Split learning's parties sit in different organisations, tens of milliseconds apart.
    Where the kernel's ``netem`` is not available (``tc qdisc ... netem`` needs a module this
    machine lacks), these asyncio proxies stand in for it. Each party gets one listening
    address that forwards to its worker; bytes crossing a proxy are delayed by the one-way
    ``delay`` in each direction and, with a ``rate``, serialised through one queue per
    direction that every connection through that proxy shares (a token bucket in virtual
    time: a chunk of ``n`` bytes occupies the link for ``n / rate`` seconds after the
    previous one, then travels ``delay`` seconds).

    Give the researcher the proxies' addresses (``splitnn.connect(proxy_url, ...)``): it
    announces the addresses it connected to as the workers' peer addresses, so party to party
    traffic dials the proxies too and every hop alice -> bob -> claire crosses one emulated link.
    Whichever side dialled, both directions of a connection are delayed once.

    What it models and what it does not: latency and a rate cap on the payload bytes (not
    TCP/IP headers), in each direction of the link *into* a party (connections that party
    dials go through its peers' proxies). No loss, no jitter, no reordering. Timers come from
    the event loop, so a delay can run late by about a millisecond; measure the emulator
    itself (:func:`measure_rtt`) when that matters.

        async with LinkEmulator() as emu:
            addr = await emu.add("bob", "127.0.0.1:7002", delay=0.010, rate=parse_rate("100mbit"))
    """

    def __init__(self) -> None:
        self.proxies: dict[str, _Proxy] = {}
        self._tasks: set[asyncio.Task] = set()
        self._accepted: set[socket.socket] = set()  # client sockets, from accept until their streams exist
        self._writers: set[asyncio.StreamWriter] = set()
        self._closed = False

    async def __aenter__(self) -> LinkEmulator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def add(
        self,
        name: str,
        target: str,
        *,
        delay: float | str = 0.0,
        rate: float | str | None = None,
        listen: str = "127.0.0.1:0",
    ) -> str:
        """Listen on ``listen`` and forward to ``target`` (``host:port``) through an emulated link; return the
        bound ``host:port`` to give out in place of ``target``."""
        if self._closed:
            raise RuntimeError("this LinkEmulator is closed")
        if name in self.proxies:
            raise ConfigurationError(f"link emulator: {name!r} already has a proxy")
        proxy = _Proxy(name, _split(target), LinkProfile(delay, rate))
        host, port = _split(listen)
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(128)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            raise ConfigurationError(f"link emulator cannot listen on {listen}: {exc}") from None
        proxy.listener = listener
        proxy.address = (
            f"[{host}]:{listener.getsockname()[1]}" if ":" in host else f"{host}:{listener.getsockname()[1]}"
        )
        self.proxies[name] = proxy
        self._spawn(self._accept(proxy, listener))
        return proxy.address

    def set(self, name: str | None = None, *, delay: float | str | None = None, rate: Any = ...) -> None:
        """Change the delay and/or rate of proxy ``name`` (of all proxies when None). ``rate=None`` lifts the cap."""
        for proxy in self.proxies.values() if name is None else [self.proxies[name]]:
            if delay is not None:
                proxy.profile.delay = parse_delay(delay)
            if rate is not ...:
                proxy.profile.rate = parse_rate(rate)

    def drop(self, name: str | None = None) -> int:
        """Cut every connection open through proxy ``name`` (all proxies when None), as a network fault
        does: both ends are reset at once. New connections are accepted as before (the fault is transient).
        Returns how many connection ends were cut."""
        cut = 0
        for proxy in self.proxies.values() if name is None else [self.proxies[name]]:
            for w in list(proxy.connections):
                w.transport.abort()
                cut += 1
        return cut

    # -- forwarding ---------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, proxy: _Proxy, listener: socket.socket) -> None:
        """Accept connections (our own loop rather than asyncio's server: every socket is tracked at once)."""
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            _no_delay(conn)  # asyncio leaves an accepted socket's Nagle on (see _no_delay)
            self._accepted.add(conn)
            self._spawn(self._serve(proxy, conn))

    async def _serve(self, proxy: _Proxy, conn: socket.socket) -> None:
        writer = upstream = None
        try:
            try:
                reader, writer = await asyncio.open_connection(sock=conn)
            finally:
                self._accepted.discard(conn)
            self._writers.add(writer)
            proxy.connections.add(writer)
            try:
                up_reader, upstream = await asyncio.open_connection(*proxy.target)
            except OSError:
                return  # the worker is not there: the client sees its connection close
            self._writers.add(upstream)
            proxy.connections.add(upstream)
            _no_delay(upstream.get_extra_info("socket"))
            await asyncio.gather(
                self._pump(reader, upstream, proxy.to_worker, writer),
                self._pump(up_reader, writer, proxy.from_worker, upstream),
            )
        finally:
            if writer is None:
                conn.close()
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    proxy.connections.discard(w)
                    w.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Direction,
        source: asyncio.StreamWriter,
    ) -> None:
        """Copy ``reader`` to ``writer``, each chunk released at the time ``link`` gives it.

        End of stream is passed on (half-close) after the last chunk; a broken connection
        closes both sides (``writer`` and ``source``, the writer of ``reader``'s socket).
        """
        loop = asyncio.get_running_loop()
        queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        ready = asyncio.Event()
        space = asyncio.Event()
        buffered = 0

        async def send() -> None:
            nonlocal buffered
            while True:
                while not queue:
                    ready.clear()
                    await ready.wait()
                at, data = queue.popleft()
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                buffered -= len(data)
                space.set()
                await writer.drain()

        sender = self._spawn(send())
        try:
            while True:
                data = await reader.read(link.read_size())
                now = loop.time()
                if not data:  # end of stream: passed on after what is in flight
                    queue.append((max(now, link.free_at) + link.profile.delay, None))
                    ready.set()
                    break
                queue.append((link.deliver_at(len(data), now), data))
                ready.set()
                buffered += len(data)
                while buffered > link.buffer_cap() and not sender.done():
                    space.clear()
                    await space.wait()
                if sender.done():
                    break
            await sender
        except (ConnectionError, OSError):
            writer.close()
            source.close()
        finally:
            if not sender.done():
                sender.cancel()

    # -- closing ------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Stop listening, cut every connection, and wait for every task of the emulator to end."""
        self._closed = True
        writers = list(self._writers)  # before the tasks end and forget them: each is awaited closed below
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for proxy in self.proxies.values():
            if proxy.listener is not None:
                proxy.listener.close()
        for conn in self._accepted:
            conn.close()
        self._accepted.clear()
        writers += self._writers
        self._writers.clear()
        for w in writers:
            w.close()
        for w in writers:
            try:
                await w.wait_closed()
            except (ConnectionError, OSError):
                pass


def _no_delay(sock: object) -> None:
    """Turn Nagle's algorithm off on a proxy socket, so that the proxy adds only the delay it is told to.

    With it on, a small write that follows another whose ACK is outstanding waits for that ACK,
    which the receiver delays by up to 40 ms: a worker's reply to a command nobody waits for,
    then the reply the researcher does wait for, took 40 ms more through a 0 ms proxy. The
    parties' own sockets (gRPC) already set TCP_NODELAY; asyncio does not for a socket it is given.
    """
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ThreadedLinkEmulator:
    """A :class:`LinkEmulator` running on its own event loop thread, for synchronous code.

    Use as a context manager; :meth:`add` and :meth:`set` are as on :class:`LinkEmulator`.
    """

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="splitnn-linkemu", daemon=True)
        self._thread.start()
        self.emulator = LinkEmulator()

    def call(self, coro: Coroutine) -> Any:
        """Run ``coro`` on the emulator's loop and return its result (e.g. to start a test server there)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout)

    def add(self, name: str, target: str, **kwargs: Any) -> str:
        return self.call(self.emulator.add(name, target, **kwargs))

    def close_server(self, server: asyncio.AbstractServer) -> None:
        """Close a server started on the emulator's loop (with :meth:`call`), from any thread: an asyncio
        server must be closed on its own loop."""

        async def close() -> None:
            server.close()
            await server.wait_closed()

        self.call(close())

    def set(self, name: str | None = None, **kwargs: Any) -> None:
        async def apply() -> None:
            self.emulator.set(name, **kwargs)

        self.call(apply())

    def drop(self, name: str | None = None) -> int:
        """As :meth:`LinkEmulator.drop`."""

        async def apply() -> int:
            return self.emulator.drop(name)

        return self.call(apply())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self.call(self.emulator.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self.timeout)
            self._loop.close()

    def __enter__(self) -> ThreadedLinkEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------ measuring
def _blocking_connect(address: str, timeout: float) -> socket.socket:
    sock = socket.create_connection(_split(address), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> None:
    while n > 0:
        got = sock.recv(min(n, 1 << 20))
        if not got:
            raise ConnectionError("the echo peer closed the connection")
        n -= len(got)


def measure_rtt(address: str, samples: int = 9, timeout: float = 30.0) -> list[float]:
    """Round trips (seconds) of one byte to an echo server at ``address``, over one connection."""
    with _blocking_connect(address, timeout) as sock:
        out = []
        for _ in range(samples + 1):
            t0 = time.perf_counter()
            sock.sendall(b"x")
            _recv_exactly(sock, 1)
            out.append(time.perf_counter() - t0)
        return out[1:]  # the first includes the proxy's dial of the target


def measure_rate(address: str, nbytes: int, timeout: float = 60.0) -> float:
    """Seconds from the first byte sent to a sink at ``address`` until it acknowledged all ``nbytes``.

    The sink (see :func:`serve_sink`) answers one byte after each ``nbytes`` it has read.
    """
    payload = b"\x00" * nbytes
    with _blocking_connect(address, timeout) as sock:
        t0 = time.perf_counter()
        sock.sendall(payload)
        _recv_exactly(sock, 1)
        return time.perf_counter() - t0


async def serve_echo(host: str = "127.0.0.1") -> asyncio.base_events.Server:
    """A TCP echo server (for measuring the emulator); close it when done."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(READ_BYTES):
            writer.write(data)
            await writer.drain()

    return await _start_server(echo, host)


async def serve_sink(nbytes: int, host: str = "127.0.0.1") -> asyncio.base_events.Server:
    """A TCP server that reads and answers one byte after every ``nbytes`` it received."""

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = 0
        while data := await reader.read(1 << 20):
            got += len(data)
            while got >= nbytes:
                got -= nbytes
                writer.write(b"k")
                await writer.drain()

    return await _start_server(sink, host)


async def _start_server(handle, host: str) -> asyncio.base_events.Server:
    """A TCP server on a free port of ``host`` running ``handle(reader, writer)`` per connection until the
    connection ends (a reset ends it quietly), then closing it."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(reader, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, host, 0)


# ------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> None:
    """``python -m splitnn.testing.linkemu --delay 10ms [--rate 100mbit] [NAME@]LISTEN=TARGET ...``"""
    parser = argparse.ArgumentParser(
        prog="python -m splitnn.testing.linkemu",
        description="Forward each LISTEN address to its TARGET through an emulated link (one-way delay, rate cap).",
    )
    parser.add_argument("--delay", default="0ms", help="one-way delay per direction, e.g. 10ms (default 0)")
    parser.add_argument("--rate", default=None, help="bandwidth cap per direction and proxy, e.g. 10mbit")
    parser.add_argument("links", nargs="+", metavar="LISTEN=TARGET", help="e.g. 127.0.0.1:8001=127.0.0.1:7001")
    args = parser.parse_args(argv)

    async def run() -> None:
        async with LinkEmulator() as emu:
            for i, spec in enumerate(args.links):
                listen, sep, target = spec.partition("=")
                if not sep:
                    parser.error(f"write each link as LISTEN=TARGET, got {spec!r}")
                addr = await emu.add(f"link{i}", target, delay=args.delay, rate=args.rate, listen=listen)
                print(f"{addr} -> {target} (one-way {args.delay}, rate {args.rate or 'unlimited'})", flush=True)
            await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
