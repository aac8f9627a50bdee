"""Transport of networked workers: peer frames, byte counters, limits, tokens and TLS material.

Everything here is independent of what the workers compute, and imports no grpc (the
channels and servers are :mod:`splitnn.client` and :mod:`splitnn.server`): :mod:`frames`
cuts and reassembles tensor frames on the peer-to-peer data plane, :mod:`counters` counts
every byte a process puts on or takes off the wire, :mod:`security` holds the federation
token and the (mutual) TLS material, :mod:`limits` the size limits both ends agree on,
:mod:`addresses` reads and writes ``HOST:PORT``.
"""

from splitnn.transport.counters import ByteCounters
from splitnn.transport.limits import Limits
from splitnn.transport.security import TLSConfig, load_token

__all__ = ["ByteCounters", "Limits", "TLSConfig", "load_token"]
