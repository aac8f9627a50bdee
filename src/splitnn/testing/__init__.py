"""Tools for testing and benchmarking splitnn across processes and emulated networks.

* :mod:`splitnn.testing.cluster` -- start ``splitnn worker`` processes on 127.0.0.1 and always stop them;
* :mod:`splitnn.testing.linkemu` -- a userspace link emulator (TCP proxies adding delay and a rate cap).

Nothing here is imported by the rest of splitnn, and nothing here imports splitnn's upper
layers: these are plain processes and sockets.
"""
