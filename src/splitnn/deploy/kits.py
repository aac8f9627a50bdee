"""``splitnn provision``: one CA for the federation and one startup kit per party and per researcher.

Layout of ``--out DIR``::

    DIR/_provisioner/   ca.pem, ca.key, token, federation.toml   (the organiser's: never ship it)
    DIR/alice/          ca.pem, alice.pem, alice.key, token, worker.toml, start.sh,
                        splitnn-alice.service, policy.toml (data holders), README.md
    DIR/dr-lee/         ca.pem, dr-lee.pem, dr-lee.key, token, federation.toml, README.md

Private keys and tokens are written with mode 0600. Every kit is built in a temporary directory
beside its final place and renamed there only when complete, so a mistake leaves nothing
half-written. ``add=True`` (``--add``) keeps the CA, the token and every existing kit: it only
writes the kits of new parties and researchers (and refreshes each researcher's
``federation.toml`` so that it lists the new parties); a private key is never overwritten.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from splitnn.deploy.federation import Federation, Party, read_federation
from splitnn.errors import ConfigurationError
from splitnn.fileio import atomic_write_text

PROVISIONER = "_provisioner"
#: A researcher's certificate names it and the role its calls claim (``x-splitnn-party: researcher``).
RESEARCHER_ROLE_NAME = "researcher"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)  # whatever the umask


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def worker_toml(fed: Federation, p: Party) -> str:
    """The ``worker.toml`` of party ``p``: what ``splitnn worker --config`` needs (paths relative to it)."""
    lines = [
        f"# splitnn worker --config worker.toml: party {p.name} of federation {fed.name!r}.",
        "# Paths are relative to this file. A flag on the command line overrides the value here.",
        f"name = {_toml(p.name)}",
        f"listen = {_toml(_host_port(p.listen, p.port))}",
        'token_file = "token"',
        f'tls_cert = "{p.name}.pem"',
        f'tls_key = "{p.name}.key"',
        'tls_ca = "ca.pem"',
        f"device = {_toml(p.device)}",
        'state_dir = "state"',
    ]
    if p.data_port is not None:
        lines.append(f"data_listen = {_toml(_host_port(p.listen, p.data_port))}")
        lines.append(f"data_advertise = {_toml(_host_port(p.host, p.data_port))}")
    if p.metrics_port is not None:
        lines.append(f"metrics_listen = {_toml(_host_port('127.0.0.1', p.metrics_port))}")
    if p.trust:
        lines.append(f"trust = {_toml(list(p.trust))}")
    if p.data:
        lines.append(f"data = {_toml(list(p.data))}")
    if p.holds_data or p.policy:
        lines.append('policy = "policy.toml"')
    return "\n".join(lines) + "\n"


_POLICY_HELP = """\
# The policy of party {name}: what it agrees to run on its data and whom it hands what.
# It is enforced here, by this worker, before any batch; the researcher cannot change it.
# Rules (docs/failures-and-policy.md), each optional:
#   accept_segments = ["<fingerprint>"]   only segments whose `splitnn fingerprint` is listed
#   refuse_passthrough = true             refuse segments that would pass the data through
#   min_reduction = 2.0                   a segment on our data must shrink it at least this much
#   peers = ["bob"]                       the only parties that may receive our tensors
#   max_params = 1000000                  the largest segment we host
#   datasets = ["mnist:train"]            the only datasets of ours a model may read
#   release_outputs = false               never hand activations to the researcher
"""


def policy_toml(p: Party) -> str:
    """A data holder's policy template: the federation file's rules for it, and the others commented out."""
    rules = "".join(f"{k} = {_toml(v)}\n" for k, v in p.policy.items())
    return _POLICY_HELP.format(name=p.name) + ("\n" + rules if rules else "")


def start_script(p: Party) -> str:
    return (
        "#!/bin/sh\n"
        f"# Start party {p.name} from this kit (extra flags override worker.toml). $SPLITNN: the command to run\n"
        "# splitnn (default: splitnn), e.g. SPLITNN='python -m splitnn'. Stop it with SIGTERM (Ctrl-C, kill PID).\n"
        'cd "$(dirname "$0")" || exit 1\n'
        'exec ${SPLITNN:-splitnn} worker --config worker.toml "$@"\n'
    )


def systemd_unit(fed: Federation, p: Party) -> str:
    return (
        "[Unit]\n"
        f"Description=splitnn worker {p.name} (federation {fed.name})\n"
        "After=network-online.target\nWants=network-online.target\n\n"
        "[Service]\n"
        "Type=simple\n"
        "User=splitnn\n"
        f"WorkingDirectory=/opt/splitnn/{p.name}\n"
        f"ExecStart=/opt/splitnn/{p.name}/start.sh\n"
        "KillSignal=SIGTERM\n"
        "Restart=on-failure\n"
        "RestartSec=5\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def party_readme(fed: Federation, p: Party) -> str:
    ports = [f"- {p.port}/tcp (gRPC): from the researchers and the other parties"]
    if p.data_port is not None:
        ports.append(f"- {p.data_port}/tcp (peer data plane): from the other parties")
    if p.metrics_port is not None:
        ports.append(f"- {p.metrics_port}/tcp (Prometheus metrics, on 127.0.0.1 only): from your monitoring")
    policy = (
        "\n`policy.toml` is this party's policy: read it and open only what you agree to "
        "(docs/failures-and-policy.md).\n"
        if p.holds_data or p.policy
        else ""
    )
    return f"""# splitnn kit: party {p.name} of federation "{fed.name}"

This directory is everything party {p.name} needs. `{p.name}.key` and `token` are secrets:
keep them readable by the service's user only (they are written with mode 0600).

Open these ports on {p.host} (inbound):
{chr(10).join(ports)}

Start: `./start.sh` (or copy this directory to /opt/splitnn/{p.name} and
`systemctl enable --now ./splitnn-{p.name}.service`). Settings: `worker.toml`.
Check: from a researcher's kit, `splitnn status federation.toml`; from here,
`splitnn status {p.name}=grpc://{_host_port(p.host, p.port)} --token-file token --tls-cert {p.name}.pem
--tls-key {p.name}.key --tls-ca ca.pem`.
Stop: `systemctl stop splitnn-{p.name}` or SIGTERM to the worker (Ctrl-C).
{policy}"""


def researcher_file(fed: Federation, name: str) -> str:
    lines = [
        f"# The federation {fed.name!r} as researcher {name} reaches it (written by splitnn provision).",
        '# splitnn.connect_federation("federation.toml"), splitnn train --federation, splitnn status.',
        "[federation]",
        f"name = {_toml(fed.name)}",
        f"researcher = {_toml(name)}",
        'token_file = "token"',
        'ca = "ca.pem"',
        f'cert = "{name}.pem"',
        f'key = "{name}.key"',
    ]
    for p in fed.parties:
        lines += [
            "",
            "[[party]]",
            f"name = {_toml(p.name)}",
            f"address = {_toml(p.address)}",
            f"role = {_toml(p.role)}",
        ]
    return "\n".join(lines) + "\n"


def researcher_readme(fed: Federation, name: str) -> str:
    parties = "\n".join(f"- {p.name} ({p.role}) at {p.address}" for p in fed.parties)
    return f"""# splitnn kit: researcher {name} of federation "{fed.name}"

`{name}.key` and `token` are secrets (mode 0600). The parties:
{parties}

Check them: `splitnn status federation.toml`.
Train: `splitnn train --federation federation.toml ...`, or in Python
`workers = splitnn.connect_federation("federation.toml")`.
"""


# ------------------------------------------------------------------------------------------ provision
def provision(federation: str | Path | Federation, out: str | Path, *, add: bool = False) -> list[str]:
    """Write the kits of ``federation`` (a provisioning file or a checked :class:`Federation`) into ``out``.

    Returns the names of the kits written. ConfigurationError, before anything is written, for a
    bad file, an ``out`` that holds a federation already (without ``add``), a kit directory that
    exists, or (with ``add``) an ``out`` that holds no federation.
    """
    from splitnn.transport.certificates import load_ca, make_ca, make_certificate, pem_certificate, pem_private_key

    fed = federation if isinstance(federation, Federation) else read_federation(federation)
    out = Path(out)
    prov = out / PROVISIONER
    names = [p.name for p in fed.parties] + list(fed.researchers)
    if out.exists() and not out.is_dir():
        raise ConfigurationError(f"--out {out} is a file; give a directory for the kits")
    if add:
        if not (prov / "ca.key").is_file():
            raise ConfigurationError(f"--add: {out} holds no provisioned federation ({prov}/ca.key); drop --add")
        new = [n for n in names if not (out / n).exists()]
    else:
        if out.exists() and any(out.iterdir()):
            taken = [n for n in [PROVISIONER, *names] if (out / n).exists()]
            raise ConfigurationError(
                f"{out} is not empty ({', '.join(taken) or 'other files'} exist); provisioning never overwrites "
                f"a kit: give a new --out directory, or --add to add parties and researchers to it"
            )
        new = names
    for n in new:
        if (out / n).exists():  # pragma: no cover - filtered above
            raise ConfigurationError(f"kit directory {out / n} exists; remove it or choose another name")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".provision-", dir=out))
    done = False
    try:
        if add:
            ca_cert, ca_key = load_ca(prov / "ca.pem", prov / "ca.key")
            token = (prov / "token").read_text().strip()
        else:
            ca_cert, ca_key = make_ca(f"splitnn {fed.name} CA", fed.days)
            token = secrets.token_urlsafe(32)
            p_dir = staging / PROVISIONER
            p_dir.mkdir(mode=0o700)
            _write(p_dir / "ca.pem", pem_certificate(ca_cert))
            _write(p_dir / "ca.key", pem_private_key(ca_key), 0o600)
            _write(p_dir / "token", token + "\n", 0o600)
            _write(p_dir / "README.md", "The federation's CA key and token: keep them here, never in a kit.\n")
        ca_pem = pem_certificate(ca_cert)
        by_name = {p.name: p for p in fed.parties}
        for n in new:
            kit = staging / n
            kit.mkdir(mode=0o755)
            alt = [n] if n in by_name else [n, RESEARCHER_ROLE_NAME]
            cert, key = make_certificate(n, alt, ca_cert, ca_key, fed.days)
            _write(kit / "ca.pem", ca_pem)
            _write(kit / f"{n}.pem", pem_certificate(cert))
            _write(kit / f"{n}.key", pem_private_key(key), 0o600)
            _write(kit / "token", token + "\n", 0o600)
            if n in by_name:
                p = by_name[n]
                _write(kit / "worker.toml", worker_toml(fed, p))
                _write(kit / "start.sh", start_script(p), 0o755)
                _write(kit / f"splitnn-{n}.service", systemd_unit(fed, p))
                if p.holds_data or p.policy:
                    _write(kit / "policy.toml", policy_toml(p))
                _write(kit / "README.md", party_readme(fed, p))
            else:
                _write(kit / "federation.toml", researcher_file(fed, n))
                _write(kit / "README.md", researcher_readme(fed, n))
        for n in ([] if add else [PROVISIONER]) + new:
            os.rename(staging / n, out / n)
        # the organiser's copy of what was provisioned, and every researcher's view of the parties
        atomic_write_text(prov / "federation.toml", Path(fed.source).read_text() if Path(fed.source).is_file() else "")
        for r in fed.researchers:
            if r not in new and (out / r).is_dir():
                atomic_write_text(out / r / "federation.toml", researcher_file(fed, r))
        done = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not done:
            shutil.rmtree(out, ignore_errors=True)
    return new
