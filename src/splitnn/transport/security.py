"""Federation token and (mutual) TLS for networked workers.

Every gRPC call carries the federation token in metadata (``x-splitnn-token``) and the
caller's party name (``x-splitnn-party``); a server rejects a missing or wrong token
with ``UNAUTHENTICATED``. With TLS, each party presents a certificate signed by the
federation's CA whose common name or DNS subject-alternative name is its party name;
a server checks that the certificate of a caller matches the party it claims to be,
and a client checks (through the TLS target name) that the server is the party it
meant to reach.

Nothing here imports grpc: :class:`TLSConfig` is data (paths, read on demand); the gRPC
credentials are made from it by the role that needs them (the researcher's client:
:func:`splitnn.client.channels.channel_credentials`; the worker's server:
:func:`splitnn.server.gate.server_credentials`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from splitnn.errors import ConfigurationError

TOKEN_KEY = "x-splitnn-token"
PARTY_KEY = "x-splitnn-party"
#: The researcher's session id (a secret the worker issues; see splitnn.server.sessions). A ``hello`` call asking
#: for a new session (NEW_SESSION_KEY "1") gets it back in the trailing metadata under this key.
SESSION_KEY = "x-splitnn-session"
NEW_SESSION_KEY = "x-splitnn-new-session"
#: On a peer stream: the public tag of the dialled worker's session the stream serves.
PEER_SESSION_KEY = "x-splitnn-peer-session"
#: On a researcher's Session stream: the stream's own id (its commands and replies are kept under it, so a
#: broken stream can be resumed; see splitnn.server.replay) and, optionally, the id of a stream it replaces.
STREAM_KEY = "x-splitnn-stream"
REPLACES_KEY = "x-splitnn-replaces"
MAX_TOKEN_CHARS = 4096


def load_token(path: str | Path) -> str:
    """Read the federation token from a file (surrounding whitespace ignored)."""
    p = Path(path)
    try:
        token = p.read_text().strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the token file {p}: {exc.strerror}") from None
    check_token_text(token, str(p))
    return token


_RESEARCHER_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def load_researcher_tokens(path: str | Path) -> dict[str, str]:
    """Researchers' own tokens from a file (``splitnn worker --researcher-tokens``): one ``NAME TOKEN`` a line,
    blank lines and ``#`` comments ignored; names and tokens unique. Returns name -> token."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the researcher tokens file {p}: {exc.strerror}") from None
    tokens: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        name, _, token = text.partition(" ")
        token = token.strip()
        where = f"{p}, line {n}"
        if not _RESEARCHER_NAME.fullmatch(name) or not token:
            raise ConfigurationError(f"{where}: write 'NAME TOKEN' (NAME: 1-64 of [A-Za-z0-9_.@-])")
        check_token_text(token, where)
        if name in tokens or token in tokens.values():
            raise ConfigurationError(f"{where}: researcher {name!r} or its token is listed twice")
        tokens[name] = token
    if not tokens:
        raise ConfigurationError(f"{p}: no researcher tokens in it")
    return tokens


def check_token_text(token: str, where: str = "token") -> str:
    """Refuse an empty, over-long or non-printable token."""
    if not isinstance(token, str) or not token:
        raise ConfigurationError(f"{where}: the federation token is empty; every party needs the same non-empty token")
    if len(token) > MAX_TOKEN_CHARS or not token.isprintable() or not token.isascii():
        raise ConfigurationError(f"{where}: the token must be at most {MAX_TOKEN_CHARS} printable ASCII characters")
    return token


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    if not given:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def call_metadata(
    token: str, party: str, *, session: str | None = None, peer_session: str | None = None, new_session: bool = False
) -> tuple[tuple[str, str], ...]:
    """Metadata every call carries; a researcher's calls add its session id (or ask for a new one: ``new_session``),
    a peer stream the session tag."""
    md = [(TOKEN_KEY, token), (PARTY_KEY, party)]
    if session is not None:
        md.append((SESSION_KEY, session))
    if new_session:
        md.append((NEW_SESSION_KEY, "1"))
    if peer_session is not None:
        md.append((PEER_SESSION_KEY, peer_session))
    return tuple(md)


@dataclass(frozen=True)
class TLSConfig:
    """One party's TLS material: its certificate and key, and the federation's CA.

    With ``ca`` set, the party also *requires* and verifies its callers' certificates
    (mutual TLS).
    """

    cert: Path
    key: Path
    ca: Path | None = None

    def read_files(self) -> tuple[bytes, bytes, bytes | None]:
        """The certificate, key and CA (or None) as bytes; ConfigurationError naming a file that cannot be read."""
        try:
            return (
                Path(self.cert).read_bytes(),
                Path(self.key).read_bytes(),
                Path(self.ca).read_bytes() if self.ca else None,
            )
        except OSError as exc:
            raise ConfigurationError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None


def certificate_fingerprint(auth_context: dict) -> str | None:
    """A short SHA-256 fingerprint of the caller's verified certificate (None: it presented none)."""
    pem = (auth_context.get("x509_pem_cert") or [None])[0]
    if not pem:
        return None
    return hashlib.sha256(pem if isinstance(pem, bytes) else str(pem).encode()).hexdigest()[:16]


def peer_identities(auth_context: dict) -> set[str]:
    """Names a caller's verified certificate vouches for (common name and DNS SANs)."""
    names: set[str] = set()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth_context.get(key, []) or []:
            names.add(value.decode() if isinstance(value, bytes) else str(value))
    return names
