"""Bearer JWTs: verified against the public keys of a local JWKS file, they
yield the caller's Identity (the subject, and the tenant claim when present).

Only public-key algorithms are accepted, and each key is bound at load to the
algorithms its type allows, so neither "alg": "none" nor the HS256-with-the-
public-key confusion can get a forged token through (RFC 8725 §2.1, §3.1)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt

from rag_grpc.errors import Unauthenticated
from rag_grpc.security.identity import Identity
from rag_grpc.security.jwt_keys import (
    PUBLIC_KEY_ALGORITHMS,
    JwtConfigError,
    VerificationKey,
    listed,
    load_key_set,
)
from rag_grpc.security.policy import TENANT_NAME

__all__ = [
    "PUBLIC_KEY_ALGORITHMS",
    "JwtConfigError",
    "JwtSettings",
    "JwtVerifier",
    "looks_like_jwt",
]

# More skew than this is a broken clock, not skew; a larger leeway would quietly
# extend the life of every token.
_MAX_LEEWAY_S = 300.0

# Longer than any sensible token and than gRPC's default 8 KiB of metadata;
# refused before any base64 or JSON work is spent on it.
_MAX_TOKEN_CHARS = 16_384

# Header.payload.signature; the signature may be empty (alg "none"), so that such
# a token is routed here and refused with a clear message rather than treated as
# an unknown API key.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

# Principals of this form are minted by api_keys.py only; a token whose subject
# claims one would impersonate an API key's grants.
_API_KEY_PRINCIPAL_PREFIX = "apikey:"


@dataclass(frozen=True)
class JwtSettings:
    """Where the issuer's public keys are and what a token must say: its issuer,
    audience and algorithm, with leeway_s seconds of clock skew allowed on exp,
    nbf and iat. tenant_claim names the claim carrying the caller's tenant
    (None to ignore tenants in tokens); subject_claim the caller's principal."""

    jwks_file: Path
    issuer: str
    audience: str
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    leeway_s: float = 30
    tenant_claim: str | None = "tenant"
    subject_claim: str = "sub"

    def __post_init__(self) -> None:
        if not self.issuer:
            raise JwtConfigError("jwt issuer must be set (the exact 'iss' tokens carry)")
        if not self.audience:
            raise JwtConfigError("jwt audience must be set (the 'aud' tokens are issued for)")
        if not self.algorithms:
            raise JwtConfigError(
                f"jwt algorithms must name at least one of {listed(PUBLIC_KEY_ALGORITHMS)}"
            )
        for algorithm in self.algorithms:
            if algorithm.lower() == "none":
                raise JwtConfigError("jwt algorithm 'none' would accept unsigned tokens")
            if algorithm.upper().startswith("HS"):
                raise JwtConfigError(
                    f"jwt algorithm {algorithm} is a shared-secret algorithm; only public-key "
                    f"algorithms are accepted: {listed(PUBLIC_KEY_ALGORITHMS)}"
                )
            if algorithm not in PUBLIC_KEY_ALGORITHMS:
                raise JwtConfigError(
                    f"jwt algorithm {algorithm!r} is not supported; "
                    f"use {listed(PUBLIC_KEY_ALGORITHMS)}"
                )
        if not (math.isfinite(self.leeway_s) and 0 <= self.leeway_s <= _MAX_LEEWAY_S):
            raise JwtConfigError(
                f"jwt leeway_s must be between 0 and {_MAX_LEEWAY_S:g} seconds, got {self.leeway_s}"
            )
        if not self.subject_claim:
            raise JwtConfigError("jwt subject_claim must name a claim (usually 'sub')")
        if self.tenant_claim == "":
            raise JwtConfigError("jwt tenant_claim must name a claim, or be unset")


class JwtVerifier:
    """Verifies bearer JWTs against the keys of settings.jwks_file. The file is
    read at construction (a bad one raises JwtConfigError) and again on reload()."""

    def __init__(self, settings: JwtSettings) -> None:
        self.settings = settings
        self._key_set = load_key_set(settings.jwks_file, settings.algorithms)

    @property
    def key_ids(self) -> tuple[str | None, ...]:
        """The key ids now loaded, in file order (for logs after a reload)."""
        return tuple(key.kid for key in self._key_set.keys)

    def reload(self) -> JwtConfigError | None:
        """Re-read the JWKS file, as after the issuer rotated its keys. If the new
        file cannot be used the current keys stay in force and the error is
        returned for the caller to log: a half-written file must not lock
        everyone out."""
        try:
            key_set = load_key_set(self.settings.jwks_file, self.settings.algorithms)
        except JwtConfigError as error:
            return error
        # One reference swap: a verify() running on another thread sees either
        # the old set or the new one, never a mix.
        self._key_set = key_set
        return None

    def verify(self, token: str) -> Identity:
        """The identity a valid token names; raises Unauthenticated saying what is
        wrong with any other (the token itself never appears in the message)."""
        if len(token) > _MAX_TOKEN_CHARS:
            raise Unauthenticated(
                f"token is {len(token)} characters long; at most {_MAX_TOKEN_CHARS} are accepted"
            )
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as error:
            raise Unauthenticated(f"token is not a well-formed JWT: {error}") from None
        algorithm = self._allowed_algorithm(header.get("alg"))
        key = self._key_for(header.get("kid"))
        verification_key = key.by_algorithm.get(algorithm)
        if verification_key is None:
            raise Unauthenticated(
                f"token algorithm {algorithm} does not fit key {_key_name(key)} "
                f"({key.kind}, which verifies {listed(key.by_algorithm)})"
            )
        claims = self._verified_claims(token, verification_key, key)
        return self._identity(claims)

    def _allowed_algorithm(self, algorithm: Any) -> str:
        """The token's alg if this server accepts it; checked before any key is
        touched, so a token cannot pick an algorithm its key was not meant for."""
        allowed = listed(self.settings.algorithms)
        if not isinstance(algorithm, str) or not algorithm:
            raise Unauthenticated(f"token header has no algorithm (alg); expected one of {allowed}")
        if algorithm.lower() == "none":
            raise Unauthenticated(
                f"token is unsigned (alg none); a token signed with {allowed} is required"
            )
        if algorithm.upper().startswith("HS"):
            raise Unauthenticated(
                f"token algorithm {_shown(algorithm)} is a shared-secret algorithm; "
                f"this server accepts only {allowed}"
            )
        if algorithm not in self.settings.algorithms:
            raise Unauthenticated(
                f"token algorithm {_shown(algorithm)} is not allowed; allowed: {allowed}"
            )
        return algorithm

    def _key_for(self, kid: Any) -> VerificationKey:
        """The key a token names by kid; a token without one only when the set
        holds a single key, so there is no guessing among keys."""
        key_set = self._key_set  # one read, in case reload() swaps it meanwhile
        if kid is None:
            if len(key_set.keys) == 1:
                return key_set.keys[0]
            raise Unauthenticated(
                f"token has no key id (kid) and the key set holds {len(key_set.keys)} keys; "
                "the issuer must name its signing key"
            )
        key = key_set.by_kid.get(kid)
        if key is None:
            known = listed(k.kid for k in key_set.keys if k.kid is not None)
            raise Unauthenticated(
                f"unknown key id {_shown(kid)} (known: {known}); if the issuer rotated its "
                "keys, update the JWKS file and reload it"
            )
        return key

    def _verified_claims(
        self, token: str, verification_key: jwt.PyJWK, key: VerificationKey
    ) -> dict[str, Any]:
        """The claims of a token whose signature, times, issuer and audience check
        out. PyJWT does the checks; this turns its errors into messages a person
        can act on, quoting the (by then signature-verified) claims at fault."""
        settings = self.settings
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=verification_key,
                algorithms=[verification_key.algorithm_name],
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        # The claim errors below are raised only after the signature verified, so
        # the claims quoted in their messages are the issuer's, not an attacker's.
        except jwt.ExpiredSignatureError:
            exp = _unverified_claims(token).get("exp")
            raise Unauthenticated(
                f"token expired at {_when(exp)} (server time {_now()}, "
                f"leeway {settings.leeway_s:g} s); get a new token"
            ) from None
        except jwt.ImmatureSignatureError:
            claims = _unverified_claims(token)
            if "nbf" in claims:
                raise Unauthenticated(
                    f"token is not valid before {_when(claims['nbf'])} (nbf; server time "
                    f"{_now()}, leeway {settings.leeway_s:g} s)"
                ) from None
            raise Unauthenticated(
                f"token was issued in the future, at {_when(claims.get('iat'))} (iat; server "
                f"time {_now()}, leeway {settings.leeway_s:g} s); check the issuer's clock"
            ) from None
        except jwt.MissingRequiredClaimError as error:
            reason = {"exp": "tokens that never expire are refused"}.get(error.claim, "required")
            raise Unauthenticated(f"token has no {error.claim!r} claim; {reason}") from None
        except jwt.InvalidIssuerError:
            iss = _unverified_claims(token).get("iss")
            raise Unauthenticated(
                f"token issuer {_shown(iss)} is not {settings.issuer!r}"
            ) from None
        except jwt.InvalidAudienceError:
            aud = _unverified_claims(token).get("aud")
            raise Unauthenticated(
                f"token audience {_shown(aud)} is not {settings.audience!r}"
            ) from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated(
                f"token signature does not verify with key {_key_name(key)}: it was "
                "signed with another key or altered after signing"
            ) from None
        except jwt.InvalidTokenError as error:
            # The remaining errors (a malformed segment, a claim of the wrong type)
            # carry PyJWT's own message, which names the part but not its content.
            raise Unauthenticated(f"token is not valid: {error}") from None
        return claims

    def _identity(self, claims: dict[str, Any]) -> Identity:
        """The identity the verified claims name."""
        subject_claim, tenant_claim = self.settings.subject_claim, self.settings.tenant_claim
        subject = claims.get(subject_claim)
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated(
                f"token has no {subject_claim!r} claim naming the caller (a non-empty string)"
            )
        if subject.startswith(_API_KEY_PRINCIPAL_PREFIX):
            raise Unauthenticated(
                f"token subject {_shown(subject)} has the form of an API key principal, "
                "which only API keys may carry"
            )
        tenant: str | None = None
        if tenant_claim is not None and tenant_claim in claims:
            value = claims[tenant_claim]
            if not isinstance(value, str):
                raise Unauthenticated(
                    f"token claim {tenant_claim!r} must be a string, got {type(value).__name__}"
                )
            if not TENANT_NAME.fullmatch(value):
                raise Unauthenticated(
                    f"token claim {tenant_claim!r} is {_shown(value)}, not a tenant name "
                    "(lowercase letters, digits, '_' and '-', at most 63)"
                )
            tenant = value
        return Identity(principal=subject, source="jwt", tenant=tenant)


def looks_like_jwt(token: str) -> bool:
    """Whether a bearer token has the shape of a JWT (three base64url segments,
    the last possibly empty), to route it to JwtVerifier rather than to API keys."""
    return _JWT_SHAPE.fullmatch(token) is not None


def _unverified_claims(token: str) -> dict[str, Any]:
    """The payload without checks, to quote a claim in an error message."""
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return {}
    return claims


def _when(timestamp: Any) -> str:
    """A NumericDate claim as UTC ISO 8601, or as given when it is not one."""
    if isinstance(timestamp, int | float) and not isinstance(timestamp, bool):
        try:
            return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        except (OverflowError, OSError, ValueError):
            pass
    return _shown(timestamp)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shown(value: Any, limit: int = 80) -> str:
    """A value from a token, quoted and cut short: it is the sender's text."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key_name(key: VerificationKey) -> str:
    return repr(key.kid) if key.kid is not None else "(the only key, no kid)"
