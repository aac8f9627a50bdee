"""Dialling a worker: its address, and one gRPC channel with the agreed size limits and, optionally, TLS.

The researcher (blocking grpcio) and a worker dialling its peers (``grpc.aio``) open
their channels the same way: the message limits of :class:`~splitnn.transport.Limits`
on both, and with TLS the expected party name as the TLS target, so the server's
certificate must name the party the caller meant to reach. A worker dialling a peer is
the client side of that call, so the server (:mod:`splitnn.server.peers`) opens its
channels here too: the one import from ``server`` into ``client``, never the other way.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import grpc

from splitnn.errors import ConfigurationError
from splitnn.transport.addresses import join_host_port
from splitnn.transport.limits import Limits
from splitnn.transport.security import TLSConfig


def parse_address(url: str) -> str:
    """``grpc://host:port`` (or ``host:port``) -> ``host:port``; raises ConfigurationError."""
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"a worker address must be a string like grpc://127.0.0.1:7001, got {url!r}")
    text = url if "://" in url else f"grpc://{url}"
    parts = urlsplit(text)
    if parts.scheme not in ("grpc", "grpcs") or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigurationError(f"cannot parse worker address {url!r}; write grpc://HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not port:
        raise ConfigurationError(f"worker address {url!r} has no valid port; write grpc://HOST:PORT")
    return join_host_port(parts.hostname, port)


def channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    """gRPC channel credentials from a party's TLS material (its certificate and key, the federation CA)."""
    cert, key, ca = tls.read_files()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def open_channel(
    address: str, *, limits: Limits, tls: TLSConfig | None = None, target_name: str | None = None, aio: bool = False
) -> grpc.Channel | grpc.aio.Channel:
    """A channel to ``host:port``; ``aio`` for an asyncio channel, ``target_name`` the party expected with TLS."""
    api = grpc.aio if aio else grpc
    options = limits.client_options()  # with keepalive: a vanished peer is noticed in bounded time
    if tls is None:
        return api.insecure_channel(address, options=options)
    options = options + [("grpc.ssl_target_name_override", target_name)]
    return api.secure_channel(address, channel_credentials(tls), options=options)
