"""Transport of networked workers: peer frames, byte counters, tokens and TLS.

Everything here is independent of what the workers compute: :mod:`frames` cuts and
reassembles tensor frames on the peer-to-peer data plane, :mod:`counters` counts
every byte a process puts on or takes off the wire, :mod:`security` handles the
federation token and (mutual) TLS, :mod:`limits` holds the size limits both ends
agree on, :mod:`channels` parses worker addresses and opens channels to them.
"""

from splitnn.transport.counters import ByteCounters
from splitnn.transport.limits import Limits
from splitnn.transport.security import TLSConfig, load_token

__all__ = ["ByteCounters", "Limits", "TLSConfig", "load_token"]
