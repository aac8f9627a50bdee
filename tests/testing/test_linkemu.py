"""The link emulator is faithful: its delay, its rate cap, the sharing of that cap, and clean shutdown.

Fidelity, not speed: every figure is a median over several samples, compared with the
emulator's own overhead measured at 0 ms (or without a cap) in the same test, so a busy
machine shifts both sides alike. Sizes are generous so that timer granularity (about a
millisecond) stays well inside the 15% tolerance.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading

import pytest

from splitnn.errors import ConfigurationError
from splitnn.testing.linkemu import (
    LinkEmulator,
    ThreadedLinkEmulator,
    measure_rate,
    measure_rtt,
    parse_delay,
    parse_rate,
    serve_echo,
    serve_sink,
)

TOLERANCE = 0.15


def _address(server: asyncio.base_events.Server) -> str:
    return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.fixture
def emu():
    with ThreadedLinkEmulator() as e:
        yield e


def test_parse_rate_and_delay():
    assert parse_rate("10mbit") == 1.25e6
    assert parse_rate("1gbit") == 1.25e8
    assert parse_rate("800kbit") == 1e5
    assert parse_rate(None) is None and parse_rate(5000) == 5000.0
    assert parse_delay("10ms") == pytest.approx(0.010)
    assert parse_delay("250us") == pytest.approx(0.00025)
    assert parse_delay(0.025) == 0.025
    for bad in ("10 mbps", "fast", "-1mbit", "0mbit"):
        with pytest.raises(ConfigurationError, match="rate"):
            parse_rate(bad)
    with pytest.raises(ConfigurationError, match="delay"):
        parse_delay("soon")


def test_round_trip_is_twice_the_delay_plus_the_zero_delay_overhead(emu):
    echo = emu.call(serve_echo())
    try:
        addr = emu.add("bob", _address(echo), delay=0.0)
        overhead = statistics.median(measure_rtt(addr, samples=15))
        delay = 0.020
        emu.set("bob", delay=delay)
        rtt = statistics.median(measure_rtt(addr, samples=9))
    finally:
        emu.close_server(echo)
    expected = 2 * delay + overhead
    assert abs(rtt - expected) <= TOLERANCE * expected, (rtt, expected, overhead)


def test_rate_cap_within_tolerance_and_shared_by_concurrent_streams(emu):
    nbytes = 2_000_000
    sink = emu.call(serve_sink(nbytes))
    try:
        addr = emu.add("claire", _address(sink))
        uncapped = statistics.median(measure_rate(addr, nbytes) for _ in range(3))
        rate = parse_rate("40mbit")  # 5 MB/s: 0.4 s for the 2 MB
        emu.set("claire", rate=rate)
        capped = statistics.median(measure_rate(addr, nbytes) for _ in range(3))
        expected = nbytes / rate + uncapped
        assert abs(capped - expected) <= TOLERANCE * expected, (capped, expected, uncapped)

        # two streams at once share the one queue per direction: together they take twice as long
        # (the median of three tries, as above, so one late wake-up on a busy machine does not decide it)
        def both() -> float:
            times: list[float] = []
            threads = [threading.Thread(target=lambda: times.append(measure_rate(addr, nbytes))) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            return max(times)

        slowest = statistics.median(both() for _ in range(3))
        expected_both = 2 * nbytes / rate + uncapped
        assert abs(slowest - expected_both) <= TOLERANCE * expected_both, (slowest, expected_both)
    finally:
        emu.close_server(sink)


def test_delays_each_direction_and_passes_end_of_stream():
    """Async use: bytes go both ways intact, each way delayed; closing the client reaches the server."""

    async def main() -> None:
        received = bytearray()
        closed = asyncio.Event()

        async def server(reader, writer):
            while data := await reader.read(1 << 16):
                received.extend(data)
                writer.write(data[::-1])
            closed.set()
            writer.close()

        srv = await asyncio.start_server(server, "127.0.0.1", 0)
        async with LinkEmulator() as emu:
            addr = await emu.add("alice", _address(srv), delay=0.030)
            host, port = addr.rsplit(":", 1)
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection(host, int(port))
            t0 = loop.time()
            writer.write(b"abc")
            echoed = await reader.readexactly(3)
            elapsed = loop.time() - t0
            assert echoed == b"cba" and elapsed >= 0.060  # one delay each way, never less
            writer.close()
            await asyncio.wait_for(closed.wait(), 10)
            assert bytes(received) == b"abc"
            assert emu._tasks  # the proxy's tasks are tracked ...
        assert not emu._tasks  # ... and all ended at close
        srv.close()
        await srv.wait_closed()

    asyncio.run(main())


def test_proxy_sockets_send_small_writes_at_once(emu):
    """Both of a proxy's sockets have Nagle's algorithm off (TCP_NODELAY), as the parties' gRPC sockets do: else a
    small reply following an unacknowledged one waits for the receiver's delayed ACK (up to 40 ms)."""
    echo = emu.call(serve_echo())
    addr = emu.add("bob", _address(echo))
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"  # the proxy has both of its sockets now

        async def flags() -> list[int]:
            return [
                w.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                for w in emu.emulator._writers
            ]

        got = emu.call(flags())
    emu.close_server(echo)
    assert len(got) == 2 and all(got), got


def test_close_stops_listening_and_cuts_connections(emu):
    echo = emu.call(serve_echo())
    addr = emu.add("bob", _address(echo))
    assert measure_rtt(addr, samples=1)
    host, port = addr.rsplit(":", 1)
    held = socket.create_connection((host, int(port)), timeout=10)
    emu.close_server(echo)  # the echo server is the test's, not the emulator's
    emu.close()
    held.settimeout(10)
    assert held.recv(1) == b""  # the open connection was cut
    held.close()
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=5).close()
    assert not emu.emulator._tasks


def test_unknown_target_closes_the_client_and_names_are_unique(emu):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: connection refused
        addr = emu.add("ghost", dead)
        host, port = addr.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as c:
            c.settimeout(10)
            assert c.recv(1) == b""
    with pytest.raises(ConfigurationError, match="already"):
        emu.add("ghost", dead)
