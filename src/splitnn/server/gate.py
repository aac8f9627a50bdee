"""Who may call a worker: the federation token, researchers' own tokens, and mutual-TLS identities.

:class:`TokenGate` refuses a call with a wrong token before gRPC reads its request; :class:`Gate` makes the
full checks in the handlers (token, party name, certificate) and names a researcher's identity, under which
its sessions are counted.
"""

from __future__ import annotations

import grpc

from splitnn.accounting import RESEARCHER
from splitnn.common.messages import check_party_name
from splitnn.errors import ConfigurationError, WireError
from splitnn.transport.counters import ByteCounters
from splitnn.transport.security import (
    PARTY_KEY,
    TOKEN_KEY,
    TLSConfig,
    certificate_fingerprint,
    check_token_text,
    peer_identities,
    token_matches,
)


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """gRPC server credentials from a party's TLS material; with a CA, callers must present a certificate."""
    cert, key, ca = tls.read_files()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


class Gate:
    """A worker's callers: the federation token, researchers' own tokens (``--researcher-tokens``), and TLS.

    Args:
        name: the worker's party name (in refusals).
        token: the federation token every caller must present.
        tls: this party's TLS material (with a CA, a caller's certificate must name the party it claims).
        researcher_tokens: researcher name -> a token of its own, accepted for researchers' calls only.
        counters: where refused calls are counted.
    """

    def __init__(
        self,
        name: str,
        token: str,
        *,
        tls: TLSConfig | None,
        researcher_tokens: dict[str, str] | None,
        counters: ByteCounters,
    ) -> None:
        self.name, self.tls, self.counters = name, tls, counters
        self.token = check_token_text(token)
        self.researcher_tokens = dict(researcher_tokens or {})
        for who, text in self.researcher_tokens.items():
            check_token_text(text, f"the token of researcher {who!r}")
            if token_matches(text, self.token):
                raise ConfigurationError(f"researcher {who!r}'s token is the federation token; give it one of its own")

    def researcher_token(self, token: object) -> str | None:
        """The name of the researcher whose own token ``token`` is (constant time per token), or None."""
        found = None
        for who, text in self.researcher_tokens.items():
            if isinstance(token, str) and token_matches(token, text):
                found = who
        return found

    def admits(self, metadata) -> bool:
        """Whether a call's metadata carries a token this worker accepts (the quick check, before any read)."""
        md = dict(metadata or ())
        token, party = md.get(TOKEN_KEY), md.get(PARTY_KEY)
        if isinstance(token, str) and token_matches(token, self.token):
            return True
        return party == RESEARCHER and self.researcher_token(token) is not None

    async def authenticate(self, context: grpc.aio.ServicerContext) -> str:
        """The party an RPC comes from, checked (token, name, certificate); aborts the call otherwise."""
        md = {k: v for k, v in (context.invocation_metadata() or ())}
        token = md.get(TOKEN_KEY)
        party = md.get(PARTY_KEY)
        federation = isinstance(token, str) and token_matches(token, self.token)
        # a researcher's own token (--researcher-tokens) admits researchers' calls only, never a peer's
        if not federation and not (party == RESEARCHER and self.researcher_token(token) is not None):
            self.counters.record(party if isinstance(party, str) else "?", "recv", "rejected", 0)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"worker {self.name!r}: missing or wrong federation token"
            )
        try:
            check_party_name(party)
        except WireError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"worker {self.name!r}: {exc}")
        if self.tls is not None and self.tls.ca is not None:
            ids = peer_identities(context.auth_context())
            if party not in ids:
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"worker {self.name!r}: caller claims to be {party!r} but its certificate is "
                    f"for {sorted(ids) or 'nobody'}",
                )
        return party

    def identity(self, context: grpc.aio.ServicerContext) -> str:
        """The researcher identity of an authenticated call: its certificate under mutual TLS, else its token."""
        if self.tls is not None and self.tls.ca is not None:
            fingerprint = certificate_fingerprint(context.auth_context())
            if fingerprint is not None:
                return f"certificate {fingerprint}"
        who = self.researcher_token(dict(context.invocation_metadata() or ()).get(TOKEN_KEY))
        return f"researcher {who}" if who is not None else "the federation token"


class TokenGate(grpc.aio.ServerInterceptor):
    """Refuses a call without a token the worker accepts before gRPC reads its request message.

    A unary call's handler runs only once its whole request message has arrived (up to the
    message limit, 4 MiB), so a token checked there comes after the bytes are buffered: 100
    unauthenticated 4 MiB calls took a worker up by 425 MB, which it kept. The gate looks at the
    call's metadata first and answers a call whose token is wrong with a handler that reads nothing.
    The full checks (party name, certificate) stay in the handlers (:meth:`Gate.authenticate`).
    """

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self._refuse = grpc.stream_stream_rpc_method_handler(self._refused)

    async def intercept_service(self, continuation, details):
        if self._gate.admits(details.invocation_metadata):
            return await continuation(details)
        return self._refuse  # (request streaming: its messages are never read)

    async def _refused(self, request_iterator, context) -> None:
        party = dict(context.invocation_metadata() or ()).get(PARTY_KEY)
        try:
            check_party_name(party)
        except WireError:
            party = "?"
        self._gate.counters.record(party, "recv", "rejected", 0)
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, f"worker {self._gate.name!r}: missing or wrong federation token"
        )
