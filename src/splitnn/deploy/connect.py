"""``splitnn.connect_federation``: a researcher's connections to every party of a federation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from splitnn.deploy.federation import read_researcher_file
from splitnn.errors import ConfigurationError


def connect_federation(
    path: str | Path, *, parties: Sequence[str] | None = None, timeout: float = 60.0, retries: int = 3
) -> dict:
    """Connect to the parties a researcher's ``federation.toml`` names (written by ``splitnn provision``).

    Uses the kit's token, certificate, key and CA (mutual TLS); each worker must answer to the name
    the file gives it, and prove it with its certificate. Returns ``{name: RemoteWorker}`` in the
    file's order (``parties``: only those, in that order). If one party cannot be reached, the
    connections already made are closed and the error names that party.

    >>> workers = splitnn.connect_federation("kits/dr-lee/federation.toml")  # doctest: +SKIP
    >>> model = splitnn.SplitNN(segments, [workers["alice"], workers["bob"]], optimizer="sgd:lr=0.03")  # doctest: +SKIP
    """
    from splitnn.client import connect

    fed = read_researcher_file(path)
    known = {p.name: p for p in fed.parties}
    wanted = list(parties) if parties is not None else list(known)
    missing = [n for n in wanted if n not in known]
    if missing:
        raise ConfigurationError(f"{path} names no party {missing[0]!r}; it names {sorted(known)}")
    token, tls = fed.token(), fed.tls()
    out: dict = {}
    try:
        for n in wanted:
            out[n] = connect(known[n].address, token=token, name=n, tls=tls, timeout=timeout, retries=retries)
    except BaseException:
        for w in out.values():
            w.close()
        raise
    return out
