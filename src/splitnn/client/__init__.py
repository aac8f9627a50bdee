"""The researcher's client of a remote party: :func:`connect` returns a :class:`RemoteWorker`.

* :mod:`~splitnn.client.remote` -- :class:`RemoteWorker`, the :class:`~splitnn.workers.Worker`
  protocol over the network, and :func:`connect`;
* :mod:`~splitnn.client.command_stream` -- its ordered command stream and reply reader;
* :mod:`~splitnn.client.channels` -- worker addresses, gRPC channels and their TLS credentials.

One of the two places that import grpc (the other is :mod:`splitnn.server`); what both ends
put in a message is :mod:`splitnn.common.serde`.
"""

from splitnn.client.remote import RemoteWorker, SessionNotFound, connect

__all__ = ["RemoteWorker", "SessionNotFound", "connect"]
