"""What the researcher's client and a worker's server agree on, grpc-free, used by both.

* :mod:`~splitnn.common.serde` -- every remote operation's arguments and results, each
  message's two directions side by side (``*_to_*`` / ``*_from_*`` pairs);
* :mod:`~splitnn.common.messages` -- the conventions of the ``Command``/``Reply`` envelopes:
  party names, session ids and tags, batches, replies in parts, errors.

It sits above :mod:`splitnn.workers` (it encodes their refs, stats and epoch plans) and below
:mod:`splitnn.client` and :mod:`splitnn.server`.
"""
