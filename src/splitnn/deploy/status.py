"""``splitnn status``: is every party up, and how is it? (for people and for monitoring scripts)"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from splitnn.errors import SplitNNError
from splitnn.transport.certificates import EXPIRY_WARNING_DAYS


@dataclass
class PartyStatus:
    """One party's answer to ``health``, or why there was none."""

    name: str
    address: str
    up: bool
    health: dict = field(default_factory=dict)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "address": self.address,
            "up": self.up,
            **self.health,
            "error": self.error,
            "warnings": self.warnings,
        }


def _caller(tls) -> str:
    """Who the probe says it is: with a certificate, a name it gives (``researcher`` for a researcher's)."""
    from splitnn.accounting import RESEARCHER

    if tls is None:
        return RESEARCHER
    from splitnn.transport.certificates import certificate_info

    names = certificate_info(tls.cert).names
    return RESEARCHER if RESEARCHER in names or not names else sorted(names)[0]


def check_party(
    name: str | None, address: str, *, token: str, tls=None, timeout: float = 5.0, now: datetime.datetime | None = None
) -> PartyStatus:
    """Probe one party; never raises for a party that is down or refuses (that is its status)."""
    from splitnn.client.probe import probe

    try:
        health = probe(address, token=token, name=name, tls=tls, timeout=timeout, caller=_caller(tls))
    except (SplitNNError, OSError) as exc:
        return PartyStatus(name or "?", address, False, error=str(exc))
    status = PartyStatus(name or health["name"], address, True, health)
    if name is not None and health.get("name") != name:
        status.up = False
        status.error = f"the worker there is {health.get('name')!r}, not {name!r}"
    expiry = health.get("cert_expiry")
    if isinstance(expiry, str):
        try:
            when = datetime.datetime.fromisoformat(expiry)
        except ValueError:
            when = None
        if when is not None:
            days = (when - (now or datetime.datetime.now(datetime.timezone.utc))).total_seconds() / 86400
            if days <= EXPIRY_WARNING_DAYS:
                status.warnings.append(f"certificate expires on {when:%Y-%m-%d} (in {max(days, 0):.0f} days)")
    return status


def check_federation(path: str | Path, *, timeout: float = 5.0) -> list[PartyStatus]:
    """Probe every party a researcher's ``federation.toml`` names, with its kit's token and certificate."""
    from splitnn.deploy.federation import read_researcher_file

    fed = read_researcher_file(path)
    token, tls = fed.token(), fed.tls()
    return [check_party(p.name, p.address, token=token, tls=tls, timeout=timeout) for p in fed.parties]
