"""Fixtures the security tests share: the private keys JWTs are signed with."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.security.jwts import PrivateKey


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKey]:
    """One private key per kid; RSA generation is slow, so once per module."""
    return {
        "rsa-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa-2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec-1": ec.generate_private_key(ec.SECP256R1()),
        "ed-1": ed25519.Ed25519PrivateKey.generate(),
    }
