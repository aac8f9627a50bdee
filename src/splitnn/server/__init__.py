"""A party of split learning as a gRPC server (``splitnn worker``): sessions over in-process engines.

* :mod:`~splitnn.server.server` -- :class:`WorkerServer` (the process's service and lifecycle), :func:`serve`;
  :mod:`~splitnn.server.gate` -- who may call; :mod:`~splitnn.server.streams` -- ``Session`` streams and ``Call``;
* :mod:`~splitnn.server.replay` -- a stream's commands and replies, kept across a broken call;
  :mod:`~splitnn.server.sessions` -- who owns what, and when it is freed;
* :mod:`~splitnn.server.commands` -- the operations a command may run on a session's engine;
  :mod:`~splitnn.server.executor` -- running commands in order, batches, shipped epochs;
* :mod:`~splitnn.server.exports` -- the tensors a session produced, by the researcher's id;
* :mod:`~splitnn.server.links` -- one peer stream; :mod:`~splitnn.server.peers` -- a worker's peer links, per
  session; :mod:`~splitnn.server.pushes` -- pushes kept until acknowledged; :mod:`~splitnn.server.tcp_plane`
  -- peer links over TCP (``--data-listen``); :mod:`~splitnn.server.shipped` -- a shipped epoch's inbox and plan.

One of the two places that import grpc (the other is :mod:`splitnn.client`); the engine each
session runs is :class:`splitnn.workers.VirtualWorker`, through its public API.
"""

from splitnn.server.server import ServeConfig, WorkerServer, serve

__all__ = ["WorkerServer", "ServeConfig", "serve"]
