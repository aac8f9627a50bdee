"""``splitnn status FILE|URL...``: each party up or down, its version, uptime, device, open sessions,
certificate expiry and last error; exit status 1 when a party is down (for monitoring scripts).

    splitnn status kits/dr-lee/federation.toml           # every party of a researcher's kit
    splitnn status grpc://10.0.0.5:7001 --token-file TOKEN [--tls-cert C --tls-key K --tls-ca CA]
    splitnn status alice=grpc://10.0.0.5:7001 ...         # with TLS: the party its certificate must name

A certificate expiring within 30 days is a warning in the notes (the exit status stays 0 for it).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from splitnn.cli.format import table
from splitnn.cli.options import add_credential_options
from splitnn.errors import ConfigurationError

HELP = "check that a federation's parties are up (version, uptime, sessions, certificate expiry)"
DESCRIPTION = "Probe every party named; exit 1 when one is down."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``splitnn status``."""
    p.add_argument(
        "targets",
        nargs="+",
        metavar="FILE|URL",
        help="a researcher's federation.toml (every party in it) or [NAME=]grpc://HOST:PORT addresses (with TLS, "
        "NAME is the party the certificate must name; default: the host)",
    )
    add_credential_options(
        p,
        token="token for URLs (default: $SPLITNN_TOKEN)",
        cert="your certificate, for URLs with TLS",
        key="your key, for URLs with TLS",
        ca="the federation CA, for URLs with TLS",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each party (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON (one object per party) instead of a table")


def _url_credentials(args: argparse.Namespace):
    from splitnn.transport import TLSConfig, load_token

    if args.token_file is not None:
        token = load_token(args.token_file)
    elif os.environ.get("SPLITNN_TOKEN"):
        token = os.environ["SPLITNN_TOKEN"].strip()
    else:
        raise ConfigurationError("grpc:// addresses need the federation token: --token-file FILE or $SPLITNN_TOKEN")
    tls = None
    if args.tls_cert or args.tls_key or args.tls_ca:
        if not (args.tls_cert and args.tls_key):
            raise ConfigurationError("TLS needs both --tls-cert and --tls-key (and --tls-ca)")
        tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_ca)
    return token, tls


def run(args: argparse.Namespace) -> int:
    from splitnn.deploy.status import check_federation, check_party

    if not args.timeout > 0:
        raise ConfigurationError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    urls = [t for t in args.targets if "://" in t]
    files = [t for t in args.targets if "://" not in t]
    for f in files:
        if not Path(f).is_file():
            raise ConfigurationError(f"{f}: no such file; give a researcher's federation.toml or grpc://HOST:PORT")
    creds = _url_credentials(args) if urls else None
    rows = []
    for target in args.targets:
        if target in urls:
            name, eq, url = target.partition("=")
            if not eq or "://" in name:
                name, url = None, target
            rows.append(check_party(name, url, token=creds[0], tls=creds[1], timeout=args.timeout))
        else:
            rows.extend(check_federation(target, timeout=args.timeout))
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        print(format_status(rows))
    down = [r.name for r in rows if not r.up]
    if down:
        print(f"splitnn status: {len(down)} of {len(rows)} down: {', '.join(down)}")
        return 1
    return 0


def _uptime(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    s = int(seconds)
    return f"{s // 86400}d{s % 86400 // 3600:02d}h" if s >= 86400 else f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def format_status(rows: list) -> str:
    """A table: party, address, up/DOWN, version, uptime, device, open sessions, certificate expiry, notes."""
    body = []
    for r in rows:
        h = r.health
        err = h.get("last_error")
        notes = [*r.warnings]
        if r.error:
            notes.append(r.error)
        if isinstance(err, dict):
            notes.append(f"last error: {err.get('type')} in {err.get('op')} at {err.get('at')}")
        body.append(
            [
                r.name,
                r.address,
                "up" if r.up else "DOWN",
                h.get("version", "-"),
                _uptime(h.get("uptime")),
                h.get("device", "-"),
                h.get("sessions", "-"),
                (h.get("cert_expiry") or "-")[:10],
                "; ".join(notes) or "-",
            ]
        )
    return table(["party", "address", "state", "version", "uptime", "device", "sessions", "cert expiry", "notes"], body)
