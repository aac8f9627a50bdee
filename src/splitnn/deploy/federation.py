"""The federation file: who the parties and researchers of a federation are, read and checked.

Two forms share the name ``federation.toml``: the **provisioning file** an organiser writes and
``splitnn provision`` reads (:func:`read_federation`, where its keys are written), and the
**researcher's file** ``provision`` writes into each researcher's kit (:func:`read_researcher_file`):
the parties' addresses and the researcher's own token, certificate, key and CA, which
:func:`splitnn.deploy.connect_federation`, ``splitnn train --federation`` and ``splitnn status`` use.
Every mistake is a :class:`~splitnn.errors.ConfigurationError` naming the file, the line and the key,
raised before anything is written.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitnn.errors import ConfigurationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROLES = ("data", "labels", "compute")
#: A party's or researcher's name: it names a certificate (a DNS name), a directory and a systemd unit.
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_FEDERATION_KEYS = {"name", "days"}
_PARTY_KEYS = {
    "name",
    "host",
    "port",
    "listen",
    "data_port",
    "metrics_port",
    "role",
    "device",
    "trust",
    "data",
    "policy",
}
_RESEARCHER_KEYS = {"name"}
_RESERVED = {"researcher", "ca", "_provisioner"}


@dataclass(frozen=True)
class Party:
    """One party of the federation, as the provisioning file describes it."""

    name: str
    host: str
    port: int = 7001
    listen: str = "0.0.0.0"
    data_port: int | None = None
    metrics_port: int | None = None
    role: str = "compute"
    device: str = "cpu"
    trust: tuple[str, ...] = ()
    data: tuple[str, ...] = ()
    policy: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """``grpc://host:port``, where researchers reach it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"grpc://{host}:{self.port}"

    @property
    def holds_data(self) -> bool:
        return self.role in ("data", "labels")


@dataclass(frozen=True)
class Federation:
    """A provisioning file, checked: its name, parties and researchers (in the file's order)."""

    name: str
    parties: tuple[Party, ...]
    researchers: tuple[str, ...]
    days: int = 365
    source: str = "federation.toml"


def _line(text: str, table: str | None, index: int = 0, key: str | None = None) -> int | None:
    """The 1-based line of ``key`` in table ``table`` (its ``index``-th instance; None: the top level), or of the
    table's header when the key is not written there; None when neither is found."""
    header, count, inside = None, -1, table is None
    for i, raw in enumerate(text.splitlines()):
        s = raw.strip()
        m = re.match(r"\[\[\s*([\w.-]+)\s*\]\]", s) or re.match(r"\[\s*([\w.-]+)\s*\]", s)
        if m:
            name = m.group(1)
            if name == table:
                count += 1
                inside = count == index
                if inside:
                    header = i + 1
                    if key is None:
                        return header
            elif inside and table is not None and name.startswith(table + "."):
                if key is not None and name == f"{table}.{key}":
                    return i + 1
            else:
                inside = False
            continue
        if inside and key is not None and re.match(rf"[\"']?{re.escape(key)}[\"']?\s*=", s):
            return i + 1
    return header


class _Reader:
    def __init__(self, text: str, source: str) -> None:
        self.text, self.source = text, source

    def fail(self, message: str, table: str | None = None, index: int = 0, key: str | None = None):
        line = _line(self.text, table, index, key) if table or key else None
        where = f"{self.source}, line {line}" if line else self.source
        raise ConfigurationError(f"{where}: {message}")

    def keys(self, got: dict, allowed: set[str], table: str, index: int, what: str) -> None:
        for key in got:
            if key not in allowed:
                self.fail(f"unknown key {key!r} in {what}; the keys are {sorted(allowed)}", table, index, key)

    def name(self, value: object, table: str, index: int, what: str) -> str:
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            self.fail(
                f"{what} needs a name of lower-case letters, digits and '-' (at most 63), got {value!r}",
                table,
                index,
                "name" if value is not None else None,
            )
        if value in _RESERVED:
            self.fail(f"{what}: the name {value!r} is reserved; choose another", table, index, "name")
        return value

    def port(self, value: object, table: str, index: int, key: str, optional: bool = False) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            self.fail(f"{key} must be a port number 1-65535, got {value!r}", table, index, key)
        return value

    def strings(self, value: object, table: str, index: int, key: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(f"{key} must be a list of non-empty strings, got {value!r}", table, index, key)
        return tuple(value)

    def string(self, value: object, table: str, index: int, key: str) -> str:
        if not isinstance(value, str) or not value or not value.isprintable() or " " in value:
            self.fail(f"{key} must be a non-empty string without spaces, got {value!r}", table, index, key)
        return value


def parse_federation(text: str, source: str = "federation.toml") -> Federation:
    """Check a provisioning file's text; its keys: :func:`read_federation`."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{source}: not valid TOML: {exc}") from None
    r = _Reader(text, source)
    for key in doc:
        if key not in ("federation", "party", "researcher"):
            r.fail(f"unknown key {key!r}; the file holds [federation], [[party]] and [[researcher]]", None, 0, key)
    fed = doc.get("federation")
    if not isinstance(fed, dict):
        r.fail('no [federation] table: add one with name = "..."')
    r.keys(fed, _FEDERATION_KEYS, "federation", 0, "[federation]")
    fname = fed.get("name")
    if not isinstance(fname, str) or not fname.strip() or not fname.isprintable():
        r.fail(f"[federation] needs a name, got {fname!r}", "federation", 0, "name" if "name" in fed else None)
    days = fed.get("days", 365)
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 3650:
        r.fail(f"days must be a whole number of days 1-3650, got {days!r}", "federation", 0, "days")
    raw_parties = doc.get("party", [])
    if not isinstance(raw_parties, list) or not raw_parties:
        r.fail("no [[party]] tables: a federation needs at least one party")
    parties: list[Party] = []
    names: dict[str, str] = {}
    endpoints: dict[tuple[str, int], str] = {}
    for i, p in enumerate(raw_parties):
        what = f"[[party]] #{i + 1}"
        r.keys(p, _PARTY_KEYS, "party", i, what)
        name = r.name(p.get("name"), "party", i, what)
        if name in names:
            r.fail(f"duplicate party {name!r} (also {names[name]}); give every party its own name", "party", i, "name")
        names[name] = what
        what = f"party {name!r}"
        if "host" not in p:
            r.fail(f'{what} has no host: add host = "..." (where researchers and peers reach it)', "party", i)
        host = r.string(p["host"], "party", i, "host")
        port = r.port(p.get("port", 7001), "party", i, "port")
        data_port = r.port(p.get("data_port"), "party", i, "data_port", optional=True)
        metrics_port = r.port(p.get("metrics_port"), "party", i, "metrics_port", optional=True)
        for key, value in (("port", port), ("data_port", data_port)):
            if value is None:
                continue
            if (host, value) in endpoints:
                r.fail(f"{what}: {host}:{value} is already {endpoints[(host, value)]}", "party", i, key)
            endpoints[(host, value)] = f"{what}'s {key}"
        role = p.get("role", "compute")
        if role not in ROLES:
            r.fail(f"{what}: role must be one of {list(ROLES)}, got {role!r}", "party", i, "role")
        policy = p.get("policy", {})
        if not isinstance(policy, dict):
            r.fail(f"{what}: policy must be a table ([party.policy]) of rules", "party", i, "policy")
        _check_policy(r, policy, i, what)
        parties.append(
            Party(
                name=name,
                host=host,
                port=port,
                listen=r.string(p.get("listen", "0.0.0.0"), "party", i, "listen"),
                data_port=data_port,
                metrics_port=metrics_port,
                role=role,
                device=r.string(p.get("device", "cpu"), "party", i, "device"),
                trust=r.strings(p.get("trust", []), "party", i, "trust"),
                data=r.strings(p.get("data", []), "party", i, "data"),
                policy=dict(policy),
            )
        )
    raw_researchers = doc.get("researcher", [])
    if not isinstance(raw_researchers, list) or not raw_researchers:
        r.fail("no [[researcher]] tables: name at least one researcher (who trains)")
    researchers: list[str] = []
    for i, res in enumerate(raw_researchers):
        what = f"[[researcher]] #{i + 1}"
        r.keys(res, _RESEARCHER_KEYS, "researcher", i, what)
        name = r.name(res.get("name"), "researcher", i, what)
        if name in names:
            r.fail(f"duplicate name {name!r} (also {names[name]}); every party and researcher needs its own",
                   "researcher", i, "name")  # fmt: skip
        names[name] = what
        researchers.append(name)
    return Federation(fname, tuple(parties), tuple(researchers), days, source)


def _check_policy(r: _Reader, rules: dict, index: int, what: str) -> None:
    from splitnn.workers.policy import WorkerPolicy

    try:
        WorkerPolicy.from_dict(rules, source=f"{what}'s policy")
    except ConfigurationError as exc:
        r.fail(str(exc), "party", index, "policy")


def read_federation(path: str | Path) -> Federation:
    """Read and check a provisioning file (ConfigurationError naming the line and key of any mistake). Its keys::

    [federation]
    name = "tumour-study"         # required
    days = 365                    # certificates' validity (default 365)

    [[party]]
    name = "alice"                # required: lower-case letters, digits and '-'
    host = "alice.example.org"    # required: where researchers and peers reach it
    port = 7001                   # gRPC port (default 7001)
    listen = "0.0.0.0"            # interface it listens on (default 0.0.0.0)
    data_port = 7101              # optional: TCP data plane for peer links (--data-listen)
    metrics_port = 9101           # optional: Prometheus metrics on 127.0.0.1 (--metrics-listen)
    role = "data"                 # data | labels | compute (default compute)
    device = "cpu"
    trust = ["mypkg.models"]      # --trust
    data = ["mnist:train=/srv/mnist,parts=features"]   # --data
    [party.policy]                # the party's policy rules (data holders get a template anyway)
    peers = ["bob"]

    [[researcher]]
    name = "dr-lee"
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read the federation file {path}: {exc.strerror}") from None
    return parse_federation(text, str(path))


# ------------------------------------------------------------------------- the researcher's file
@dataclass(frozen=True)
class PartyAddress:
    """A party as a researcher's kit knows it."""

    name: str
    address: str
    role: str = "compute"


@dataclass(frozen=True)
class ResearcherFile:
    """A researcher's ``federation.toml``: whom to reach, and with what (paths resolved against the file)."""

    federation: str
    researcher: str
    parties: tuple[PartyAddress, ...]
    token_file: Path
    ca: Path
    cert: Path
    key: Path

    def tls(self):
        from splitnn.transport.security import TLSConfig

        return TLSConfig(self.cert, self.key, self.ca)

    def token(self) -> str:
        from splitnn.transport.security import load_token

        return load_token(self.token_file)


def read_researcher_file(path: str | Path) -> ResearcherFile:
    """Read a researcher's ``federation.toml`` (written by ``splitnn provision`` into the researcher's kit)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        doc = tomllib.loads(text)
    except OSError as exc:
        raise ConfigurationError(f"cannot read the federation file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path}: not valid TOML: {exc}") from None
    r = _Reader(text, str(path))
    fed = doc.get("federation")
    if not isinstance(fed, dict) or "researcher" not in fed:
        r.fail(
            "not a researcher's federation file (no researcher = ... in [federation]); use the federation.toml "
            "of your kit, as written by `splitnn provision`"
        )
    for key in ("token_file", "ca", "cert", "key"):
        if not isinstance(fed.get(key), str):
            r.fail(f'[federation] needs {key} = "PATH"', "federation", 0, key if key in fed else None)
    parties = []
    seen: set[str] = set()
    for i, p in enumerate(doc.get("party", [])):
        if not isinstance(p.get("name"), str) or not isinstance(p.get("address"), str):
            r.fail("every [[party]] needs a name and an address (grpc://HOST:PORT)", "party", i)
        if p["name"] in seen:
            r.fail(f"duplicate party {p['name']!r}", "party", i, "name")
        seen.add(p["name"])
        parties.append(PartyAddress(p["name"], p["address"], str(p.get("role", "compute"))))
    if not parties:
        r.fail("no [[party]] tables: the file names no party to reach")
    base = path.parent
    return ResearcherFile(
        federation=str(fed.get("name", "")),
        researcher=str(fed["researcher"]),
        parties=tuple(parties),
        token_file=base / fed["token_file"],
        ca=base / fed["ca"],
        cert=base / fed["cert"],
        key=base / fed["key"],
    )
