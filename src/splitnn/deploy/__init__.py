"""Standing up a federation: provisioning kits, connecting to a federation, checking its parties.

* :mod:`~splitnn.deploy.federation` -- the federation file (the organiser's, and a researcher's);
* :mod:`~splitnn.deploy.kits` -- ``splitnn provision``: a CA, and one kit per party and researcher;
* :mod:`~splitnn.deploy.connect` -- :func:`connect_federation`, the researcher's connections;
* :mod:`~splitnn.deploy.status` -- ``splitnn status``: each party up or down, and its health.

This package sits beside the command line, above the researcher's client: it may use both.
See docs/deploying.md.
"""

from splitnn.deploy.federation import Federation, Party, read_federation, read_researcher_file

__all__ = ["Federation", "Party", "read_federation", "read_researcher_file", "connect_federation"]


def __getattr__(name: str) -> object:
    if name == "connect_federation":  # loads the gRPC client: only when used
        from splitnn.deploy.connect import connect_federation

        return connect_federation
    raise AttributeError(f"module 'splitnn.deploy' has no attribute {name!r}")
