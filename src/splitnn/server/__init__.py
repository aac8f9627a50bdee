"""A party of split learning as a gRPC server (``splitnn worker``): sessions over in-process engines.

* :mod:`~splitnn.server.server` -- :class:`WorkerServer` (the gRPC service), :func:`serve`;
* :mod:`~splitnn.server.sessions` -- who owns what, and when it is freed;
* :mod:`~splitnn.server.commands` -- the operations a command may run on a session's engine;
* :mod:`~splitnn.server.executor` -- running commands in order, batches, shipped epochs;
* :mod:`~splitnn.server.exports` -- the tensors a session produced, by the researcher's id;
* :mod:`~splitnn.server.peers` -- the peer streams (pull, push, abort) to other workers, per session;
* :mod:`~splitnn.server.shipped` -- the worker's side of a shipped epoch (inbox, plan checks, loop).

One of the two places that import grpc (the other is :mod:`splitnn.client`); the engine each
session runs is :class:`splitnn.workers.VirtualWorker`, through its public API.
"""

from splitnn.server.server import ServeConfig, WorkerServer, serve

__all__ = ["WorkerServer", "ServeConfig", "serve"]
