"""Bearer JWTs: real tokens signed here with RSA, EC P-256 and Ed25519 keys made by
`cryptography`, checked against a JWKS file; forged, stale and misdirected ones are
refused with a message that says what is wrong."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from rag_grpc.errors import Unauthenticated
from rag_grpc.security.identity import Identity
from rag_grpc.security.jwt_auth import (
    JwtConfigError,
    JwtSettings,
    JwtVerifier,
    looks_like_jwt,
)
from tests.security.jwts import (
    AUDIENCE,
    ISSUER,
    PrivateKey,
    b64,
    claims,
    hand_made,
    public_jwk,
    sign,
    write_jwks,
)


@pytest.fixture
def settings(tmp_path: Path, keys: dict[str, PrivateKey]) -> JwtSettings:
    jwks = [public_jwk(keys[kid], kid) for kid in ("rsa-1", "ec-1", "ed-1")]
    return JwtSettings(
        jwks_file=write_jwks(tmp_path / "jwks.json", jwks), issuer=ISSUER, audience=AUDIENCE
    )


@pytest.fixture
def verifier(settings: JwtSettings) -> JwtVerifier:
    return JwtVerifier(settings)


def refused(verifier: JwtVerifier, token: str) -> str:
    """The message a refused token gets; it must not quote the token or its signature."""
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(token)
    message = str(info.value)
    assert token not in message
    signature = token.rsplit(".", 1)[-1]
    assert not signature or signature not in message
    return message


@pytest.mark.parametrize(("kid", "alg"), [("rsa-1", "RS256"), ("ec-1", "ES256"), ("ed-1", "EdDSA")])
def test_a_valid_token_names_its_subject_and_tenant(
    verifier: JwtVerifier, keys: dict[str, PrivateKey], kid: str, alg: str
) -> None:
    token = sign(keys[kid], alg, kid, claims())
    assert looks_like_jwt(token)
    assert verifier.verify(token) == Identity(
        principal="spiffe://example.org/acme/app", source="jwt", tenant="acme"
    )


def test_tenant_is_absent_when_the_token_has_none_or_tenants_are_not_configured(
    settings: JwtSettings, keys: dict[str, PrivateKey]
) -> None:
    verifier = JwtVerifier(settings)
    assert verifier.verify(sign(keys["ec-1"], "ES256", "ec-1", claims(tenant=None))).tenant is None
    ignoring = JwtVerifier(replace(settings, tenant_claim=None))
    assert ignoring.verify(sign(keys["ec-1"], "ES256", "ec-1", claims())).tenant is None


def test_custom_subject_and_tenant_claims(
    settings: JwtSettings, keys: dict[str, PrivateKey]
) -> None:
    verifier = JwtVerifier(replace(settings, subject_claim="email", tenant_claim="org"))
    token = sign(keys["ed-1"], "EdDSA", "ed-1", claims(email="ana@example.org", org="globex"))
    assert verifier.verify(token) == Identity("ana@example.org", "jwt", "globex")


def test_expired_token(verifier: JwtVerifier, keys: dict[str, PrivateKey]) -> None:
    exp = int(time.time()) - 120
    message = refused(verifier, sign(keys["rsa-1"], "RS256", "rsa-1", claims(exp=exp)))
    assert message.startswith("token expired at 20")
    assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp)) in message


def test_token_not_yet_valid(verifier: JwtVerifier, keys: dict[str, PrivateKey]) -> None:
    later = int(time.time()) + 120
    message = refused(verifier, sign(keys["rsa-1"], "RS256", "rsa-1", claims(nbf=later)))
    assert message.startswith("token is not valid before 20")
    message = refused(verifier, sign(keys["rsa-1"], "RS256", "rsa-1", claims(iat=later)))
    assert message.startswith("token was issued in the future")


def test_leeway_allows_clock_skew_and_no_more(
    settings: JwtSettings, keys: dict[str, PrivateKey]
) -> None:
    now = int(time.time())
    late = sign(keys["ec-1"], "ES256", "ec-1", claims(exp=now - 10))
    early = sign(keys["ec-1"], "ES256", "ec-1", claims(nbf=now + 10, iat=now + 10))
    lenient, strict = JwtVerifier(settings), JwtVerifier(replace(settings, leeway_s=0))
    for token in (late, early):
        assert lenient.verify(token).principal == "spiffe://example.org/acme/app"
    assert refused(strict, late).startswith("token expired at")
    assert refused(strict, early).startswith("token is not valid before")
    too_late = sign(keys["ec-1"], "ES256", "ec-1", claims(exp=now - 40))
    assert refused(lenient, too_late).startswith("token expired at")


def test_wrong_issuer(verifier: JwtVerifier, keys: dict[str, PrivateKey]) -> None:
    token = sign(keys["rsa-1"], "RS256", "rsa-1", claims(iss="https://evil.example"))
    assert refused(verifier, token) == (
        "token issuer 'https://evil.example' is not 'https://issuer.example'"
    )


def test_wrong_audience(verifier: JwtVerifier, keys: dict[str, PrivateKey]) -> None:
    token = sign(keys["rsa-1"], "RS256", "rsa-1", claims(aud=["billing", "mail"]))
    assert refused(verifier, token) == "token audience ['billing', 'mail'] is not 'rag-grpc'"
    # One audience among several is enough.
    token = sign(keys["rsa-1"], "RS256", "rsa-1", claims(aud=["billing", AUDIENCE]))
    assert verifier.verify(token).tenant == "acme"


@pytest.mark.parametrize("claim", ["exp", "iss", "aud"])
def test_required_claims(verifier: JwtVerifier, keys: dict[str, PrivateKey], claim: str) -> None:
    token = sign(keys["rsa-1"], "RS256", "rsa-1", claims(**{claim: None}))
    assert refused(verifier, token).startswith(f"token has no {claim!r} claim")


def test_a_token_that_never_expires_is_refused(
    verifier: JwtVerifier, keys: dict[str, PrivateKey]
) -> None:
    token = sign(keys["rsa-1"], "RS256", "rsa-1", claims(exp=None))
    assert (
        refused(verifier, token) == "token has no 'exp' claim; tokens that never expire are refused"
    )


def test_unknown_key_id(verifier: JwtVerifier, keys: dict[str, PrivateKey]) -> None:
    message = refused(verifier, sign(keys["rsa-2"], "RS256", "rsa-9", claims()))
    assert message.startswith("unknown key id 'rsa-9' (known: ec-1, ed-1, rsa-1)")


def test_unsigned_token(verifier: JwtVerifier) -> None:
    for alg in ("none", "None", "NONE"):
        token = hand_made({"alg": alg, "typ": "JWT", "kid": "rsa-1"}, claims())
        assert looks_like_jwt(token)  # routed here, so refused with a clear message
        assert refused(verifier, token).startswith("token is unsigned (alg none)")


def test_hs256_signed_with_the_public_key_is_refused(
    verifier: JwtVerifier, keys: dict[str, PrivateKey]
) -> None:
    # The classic confusion: the attacker HMACs with the public key's PEM, hoping
    # the verifier feeds that same key to HMAC.
    pem = (
        keys["rsa-1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
    unsigned = hand_made(header, claims()).rstrip(".")
    signature = hmac.new(pem, unsigned.encode(), hashlib.sha256).digest()
    token = f"{unsigned}.{b64(signature)}"
    assert refused(verifier, token) == (
        "token algorithm 'HS256' is a shared-secret algorithm; "
        "this server accepts only ES256, EdDSA, RS256"
    )


def test_algorithm_not_allowed(verifier: JwtVerifier, keys: dict[str, PrivateKey]) -> None:
    # RS384 fits an RSA key, but the settings allow only RS256 for RSA.
    token = sign(keys["rsa-1"], "RS384", "rsa-1", claims())
    assert refused(verifier, token) == (
        "token algorithm 'RS384' is not allowed; allowed: ES256, EdDSA, RS256"
    )


def test_algorithm_that_does_not_fit_the_key_type(
    verifier: JwtVerifier, keys: dict[str, PrivateKey]
) -> None:
    # Signed with the EC key, but naming the RSA key's kid.
    token = sign(keys["ec-1"], "ES256", "rsa-1", claims())
    assert refused(verifier, token) == (
        "token algorithm ES256 does not fit key 'rsa-1' (RSA, which verifies RS256)"
    )


def test_tampered_payload(verifier: JwtVerifier, keys: dict[str, PrivateKey]) -> None:
    header, _, signature = sign(keys["ed-1"], "EdDSA", "ed-1", claims()).split(".")
    forged = b64(json.dumps(claims(sub="spiffe://example.org/ops")).encode())
    message = refused(verifier, f"{header}.{forged}.{signature}")
    assert message.startswith("token signature does not verify with key 'ed-1'")


def test_signed_by_another_key_with_the_same_kid(
    verifier: JwtVerifier, keys: dict[str, PrivateKey]
) -> None:
    message = refused(verifier, sign(keys["rsa-2"], "RS256", "rsa-1", claims()))
    assert message.startswith("token signature does not verify with key 'rsa-1'")


def test_tenant_claim_must_be_a_tenant_name(
    verifier: JwtVerifier, keys: dict[str, PrivateKey]
) -> None:
    token = sign(keys["ec-1"], "ES256", "ec-1", claims(tenant=["acme", "globex"]))
    assert refused(verifier, token) == "token claim 'tenant' must be a string, got list"
    token = sign(keys["ec-1"], "ES256", "ec-1", claims(tenant="acme~other"))
    assert refused(verifier, token).startswith("token claim 'tenant' is 'acme~other', not a tenant")


def test_subject_is_required_and_cannot_pose_as_an_api_key(
    verifier: JwtVerifier, keys: dict[str, PrivateKey]
) -> None:
    token = sign(keys["ec-1"], "ES256", "ec-1", claims(sub=None))
    assert refused(verifier, token).startswith("token has no 'sub' claim naming the caller")
    token = sign(keys["ec-1"], "ES256", "ec-1", claims(sub="apikey:acme-ci"))
    assert "API key principal" in refused(verifier, token)


def test_malformed_tokens(verifier: JwtVerifier) -> None:
    for token in ("not-a-token", "a.b.c", "eyJhbGciOiJSUzI1NiJ9.!!!.x"):
        assert refused(verifier, token).startswith("token is not a well-formed JWT")
    assert refused(verifier, "x" * 20_000).startswith("token is 20000 characters long")


def test_claims_of_the_wrong_type(verifier: JwtVerifier, keys: dict[str, PrivateKey]) -> None:
    token = sign(keys["ec-1"], "ES256", "ec-1", claims(exp="tomorrow"))
    assert refused(verifier, token) == (
        "token is not valid: Expiration Time claim (exp) must be an integer."
    )
    token = sign(keys["ec-1"], "ES256", "ec-1", claims(sub=42))
    assert refused(verifier, token).startswith("token is not valid: Subject must be a string")


def test_a_token_without_kid_needs_a_single_key_set(
    tmp_path: Path, keys: dict[str, PrivateKey], verifier: JwtVerifier
) -> None:
    token = sign(keys["ec-1"], "ES256", None, claims())
    assert refused(verifier, token).startswith(
        "token has no key id (kid) and the key set holds 3 keys"
    )
    single = JwtSettings(
        jwks_file=write_jwks(tmp_path / "one.json", [public_jwk(keys["ec-1"], None)]),
        issuer=ISSUER,
        audience=AUDIENCE,
    )
    assert JwtVerifier(single).verify(token).tenant == "acme"


def test_reload_picks_up_a_rotated_key_and_survives_a_broken_file(
    settings: JwtSettings, keys: dict[str, PrivateKey]
) -> None:
    verifier = JwtVerifier(settings)
    old = sign(keys["rsa-1"], "RS256", "rsa-1", claims())
    new = sign(keys["rsa-2"], "RS256", "rsa-2", claims())
    assert refused(verifier, new).startswith("unknown key id 'rsa-2'")

    write_jwks(settings.jwks_file, [public_jwk(keys["rsa-2"], "rsa-2")])
    assert verifier.reload() is None
    assert verifier.key_ids == ("rsa-2",)
    assert verifier.verify(new).tenant == "acme"
    assert refused(verifier, old).startswith("unknown key id 'rsa-1'")

    settings.jwks_file.write_text('{"keys": [')  # a half-written file
    error = verifier.reload()
    assert isinstance(error, JwtConfigError)
    assert "is not JSON" in str(error)
    assert verifier.verify(new).tenant == "acme"  # the previous keys stay in force


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"algorithms": ("HS256",)}, "HS256 is a shared-secret algorithm"),
        ({"algorithms": ("none",)}, "'none' would accept unsigned tokens"),
        ({"algorithms": ("RS999",)}, "'RS999' is not supported"),
        ({"algorithms": ()}, "must name at least one of"),
        ({"issuer": ""}, "issuer must be set"),
        ({"audience": ""}, "audience must be set"),
        ({"leeway_s": -1}, "leeway_s must be between 0 and 300 seconds"),
        ({"leeway_s": 3600}, "leeway_s must be between 0 and 300 seconds"),
        ({"subject_claim": ""}, "subject_claim must name a claim"),
        ({"tenant_claim": ""}, "tenant_claim must name a claim"),
    ],
)
def test_settings_errors(tmp_path: Path, changes: dict[str, Any], expected: str) -> None:
    arguments: dict[str, Any] = {
        "jwks_file": tmp_path / "jwks.json",
        "issuer": ISSUER,
        "audience": AUDIENCE,
        **changes,
    }
    with pytest.raises(JwtConfigError, match=expected):
        JwtSettings(**arguments)


def test_looks_like_jwt_separates_tokens_from_api_keys(keys: dict[str, PrivateKey]) -> None:
    assert looks_like_jwt(sign(keys["ec-1"], "ES256", "ec-1", claims()))
    assert looks_like_jwt("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.")
    for other in (
        "rag_" + "A" * 43,
        "a.b",
        "a.b.c.d",
        "a b.c.d",
        ".b.c",
        "a.b.c\n",
        "",
    ):
        assert not looks_like_jwt(other), other
