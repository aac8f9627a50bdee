"""``HOST:PORT`` addresses: one parser for every place a party says where it listens or where another is.

An IPv6 host is written in brackets (``[::1]:7001``); :func:`split_host_port` returns it without them and
:func:`join_host_port` puts them back.
"""

from __future__ import annotations

from splitnn.errors import ConfigurationError

#: Longest address accepted (a host name is at most 253 characters).
MAX_ADDRESS = 256


def split_host_port(
    address: object,
    what: str,
    *,
    any_port: bool = False,
    host_optional: bool = False,
    error: type[Exception] = ConfigurationError,
) -> tuple[str, int]:
    """``HOST:PORT`` -> ``(host, port)``; ``error`` naming ``what`` if it is not one.

    The port is 1-65535, or 0 too with ``any_port`` (an address to listen on: any free port); the
    host may be empty (``:PORT``) only with ``host_optional``. Configuration a user typed raises
    ConfigurationError (the default); an address from another party, ``error=WireError``.
    """
    if not isinstance(address, str) or len(address) > MAX_ADDRESS:
        raise error(f"{what} must be HOST:PORT like 127.0.0.1:7101, got {address!r}")
    host, sep, port = address.rpartition(":")
    lowest = 0 if any_port else 1
    if not sep or not port.isdigit() or not lowest <= int(port) < 65536 or (not host and not host_optional):
        raise error(f"{what} must be HOST:PORT like 127.0.0.1:7101, got {address!r}")
    return host.strip("[]"), int(port)


def join_host_port(host: str, port: int) -> str:
    """``(host, port)`` -> ``HOST:PORT`` (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
