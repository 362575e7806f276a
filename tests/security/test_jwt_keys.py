"""The JWKS file a JwtVerifier trusts (security/jwt_keys.py): each way a file
or a key in it is refused, with the message it gets, and encryption keys
skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from rag_grpc.security.jwt_auth import (
    JwtConfigError,
    JwtSettings,
    JwtVerifier,
)
from tests.security.jwts import (
    AUDIENCE,
    ISSUER,
    PrivateKey,
    b64,
    claims,
    public_jwk,
    sign,
    write_jwks,
)


def test_encryption_keys_in_the_set_are_skipped(
    tmp_path: Path, keys: dict[str, PrivateKey]
) -> None:
    jwks = [
        public_jwk(keys["rsa-2"], "enc-1", use="enc", alg="RSA-OAEP"),
        public_jwk(keys["rsa-1"], "rsa-1", use="sig", alg="RS256"),
    ]
    settings = JwtSettings(write_jwks(tmp_path / "jwks.json", jwks), ISSUER, AUDIENCE)
    verifier = JwtVerifier(settings)
    assert verifier.key_ids == ("rsa-1",)
    assert verifier.verify(sign(keys["rsa-1"], "RS256", "rsa-1", claims())).tenant == "acme"


def config_error(tmp_path: Path, jwks: Any, **settings: Any) -> str:
    path = tmp_path / "jwks.json"
    path.write_text(jwks if isinstance(jwks, str) else json.dumps({"keys": jwks}))
    with pytest.raises(JwtConfigError) as info:
        JwtVerifier(JwtSettings(path, ISSUER, AUDIENCE, **settings))
    return str(info.value)


def test_jwks_file_errors(tmp_path: Path, keys: dict[str, PrivateKey]) -> None:
    with pytest.raises(JwtConfigError, match="does not exist"):
        JwtVerifier(JwtSettings(tmp_path / "missing.json", ISSUER, AUDIENCE))
    assert "is not JSON: Expecting value at line 1 column 1" in config_error(tmp_path, "nope")
    assert 'must be a JSON object {"keys": [...]}' in config_error(tmp_path, "[]")
    assert "holds no signing keys" in config_error(tmp_path, [])
    assert "key #1 is not a JSON object" in config_error(tmp_path, ["x"])


def test_jwks_key_errors(tmp_path: Path, keys: dict[str, PrivateKey]) -> None:
    rsa_1 = public_jwk(keys["rsa-1"], "rsa-1")
    ec_1 = public_jwk(keys["ec-1"], "ec-1")
    p384 = public_jwk(ec.generate_private_key(ec.SECP384R1()), "p384")
    weak = public_jwk(rsa.generate_private_key(public_exponent=65537, key_size=1024), "weak")
    private = {**ec_1, "d": b64(b"\x01" * 32)}
    cases = {
        "its alg RS512 is not among the allowed algorithms": [{**rsa_1, "alg": "RS512"}],
        "alg 'ES256' does not fit its RSA key": [{**rsa_1, "alg": "ES256"}],
        "its EC P-384 key verifies ES384, none of which is among the allowed": [p384],
        "is a shared secret (kty oct)": [{"kty": "oct", "k": b64(b"secret"), "kid": "h"}],
        "holds a private key ('d')": [private],
        "unsupported key type kty='XYZ'": [{"kty": "XYZ", "kid": "x"}],
        "is not a usable EC P-256 key": [{**ec_1, "x": b64(b"short")}],
        "below the minimum recommended size of 2048 bits": [weak],
        "kid 'rsa-1' is used by two keys": [rsa_1, {**ec_1, "kid": "rsa-1"}],
        "the EC P-256 key has no kid; with more than one key": [
            rsa_1,
            public_jwk(keys["ec-1"], None),
        ],
        "kid must be a string": [{**rsa_1, "kid": 7}],
        "kty and crv must be strings": [{**ec_1, "crv": ["P-256"]}],
        "alg must be a string": [{**rsa_1, "alg": ["RS256"]}],
        "is not a usable RSA key": [{"kty": "RSA", "kid": "r", "e": "AQAB"}],
    }
    for expected, jwks in cases.items():
        assert expected in config_error(tmp_path, jwks), expected
    # Allowing the key's algorithm makes the same file usable.
    path = write_jwks(tmp_path / "p384.json", [p384])
    JwtVerifier(JwtSettings(path, ISSUER, AUDIENCE, algorithms=("ES384",)))
