"""Authentication: which credential of a call names the caller, in one order.

1. A trusted proxy (our Envoy: a trusted address and, with
   auth.proxy_identity, that certificate) over mutual TLS or a trusted unix
   socket: the identity it forwards in x-forwarded-client-cert. The proxy
   itself is never the caller; without that header its calls fall through
   to 3.
2. Anyone else over mutual TLS: its client certificate (URI SAN, else CN).
3. `authorization: Bearer <x>`: the shared server token, an API key
   ("rag_..."), or a JWT; or `x-api-key: <key>`.

A credential that is present but wrong is refused (Unauthenticated, saying
what to fix and never echoing the secret) rather than passed over for a
weaker one, so a typo cannot silently make a call anonymous.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable, Iterable, Mapping

from rag_grpc.errors import Unauthenticated
from rag_grpc.security.api_keys import API_KEY_PREFIX, ApiKeys
from rag_grpc.security.identity import Identity
from rag_grpc.security.jwt_auth import JwtVerifier, looks_like_jwt
from rag_grpc.security.tls import has_client_certificate, peer_identity
from rag_grpc.security.xfcc import TrustedProxies, forwarded_identity

# The principal of a caller holding the shared server token (server.auth_token).
TOKEN_PRINCIPAL = "token:server"


class Authenticator:
    """Turns what a call presents (metadata, peer address, TLS auth context)
    into its Identity, or None when it presents nothing."""

    def __init__(
        self,
        *,
        token: str | None = None,
        jwt: JwtVerifier | None = None,
        api_keys: Callable[[], ApiKeys | None] = lambda: None,
        trusted_proxies: TrustedProxies | None = None,
        proxy_identity: str | None = None,
        client_certificates: bool = False,
    ) -> None:
        self._token = token.encode() if token else None
        self.jwt = jwt
        self._api_keys = api_keys
        self._trusted = trusted_proxies or TrustedProxies()
        # Parsing the peer's address took a third of an API-key call's
        # authentication; a connection's calls all come from one peer.
        trusted = self._trusted
        self._trusted_peer: Callable[[str], bool] = (
            functools.lru_cache(maxsize=4096)(trusted.contains)
            if trusted.networks or trusted.trust_unix_socket
            else lambda peer: False
        )
        self._proxy_identity = proxy_identity
        self._client_certificates = client_certificates

    @property
    def sources(self) -> tuple[str, ...]:
        """The credentials this server accepts, for messages and the start-up check."""
        sources = []
        if self._client_certificates:
            sources.append("a client certificate")
        if self._token is not None:
            sources.append("the server token")
        if self.jwt is not None:
            sources.append("a JWT")
        if self._api_keys() is not None:
            sources.append("an API key")
        return tuple(sources)

    def identify(
        self,
        metadata: Mapping[str, str],
        peer: str,
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> Identity | None:
        """The caller's identity; None without any credential; Unauthenticated
        for a credential that does not check out."""
        mutual_tls = has_client_certificate(auth_context)
        hop = peer_identity(auth_context) if mutual_tls else None
        if self._is_proxy(peer, mutual_tls, hop):
            forwarded = forwarded_identity(
                metadata.get("x-forwarded-client-cert"),
                peer,
                self._trusted,
                mutual_tls,
                self._proxy_identity,
            )
            if forwarded is not None:
                return forwarded
        elif mutual_tls:
            if hop is None:
                raise Unauthenticated(
                    "the client certificate names nobody: give it a URI SAN (e.g. a SPIFFE ID) "
                    "or a single subject CN"
                )
            return hop
        authorization = metadata.get("authorization")
        if authorization is not None:
            scheme, _, value = authorization.strip().partition(" ")
            value = value.strip()
            if scheme.lower() != "bearer" or not value:
                raise Unauthenticated(
                    f"the authorization metadata must be `Bearer <credential>` ({self.accepted()})"
                )
            return self._bearer(value)
        api_key = metadata.get("x-api-key")
        if api_key is not None:
            return self._api_key(api_key.strip())
        return None

    def _is_proxy(self, peer: str, mutual_tls: bool, hop: Identity | None) -> bool:
        """Whether the peer is our gateway: a trusted address and, when the
        gateway's identity is configured and the hop is mutual TLS, that
        identity's certificate. Another client on a trusted network (a
        shared subnet, the whole loopback) is then itself the caller and
        cannot speak for others by sending the header."""
        if not self._trusted_peer(peer):
            return False
        if self._proxy_identity is None or not mutual_tls:
            return True
        return hop is not None and hop.principal == self._proxy_identity

    def _bearer(self, value: str) -> Identity:
        if self._token is not None and hmac.compare_digest(value.encode(), self._token):
            return Identity(principal=TOKEN_PRINCIPAL, source="token")
        if value.startswith(API_KEY_PREFIX):
            return self._api_key(value)
        if self.jwt is not None and looks_like_jwt(value):
            return self.jwt.verify(value)
        raise Unauthenticated(
            "the bearer credential is not valid on this server: send "
            f"`authorization: Bearer <credential>` with {self.accepted()}"
        )

    def _api_key(self, key: str) -> Identity:
        keys = self._api_keys()
        if keys is None:
            raise Unauthenticated(
                "this server takes no API keys (they are listed in the policy file, "
                f"auth.policy_file); authenticate with {self.accepted()}"
            )
        identity = keys.identify(key)
        if identity is None:
            raise Unauthenticated(
                "the API key is not valid (unknown, mistyped or removed); check it or ask "
                "for a new one"
            )
        return identity

    def accepted(self) -> str:
        sources = self.sources
        return " or ".join(sources) if sources else "no credential (this server runs open)"
