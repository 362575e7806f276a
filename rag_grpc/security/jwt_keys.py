"""The JWKS file a JwtVerifier trusts: read strictly, every public key bound
at load to the signature algorithms its type allows (RSA: RS*/PS*, EC: the
ES* of its curve, OKP: EdDSA), shared secrets and private keys refused.
A key that cannot be parsed stops the load, instead of vanishing silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

# The signature algorithms each public key type can verify. A key is usable only
# with these, whatever a token's header claims: that is what stops a token from
# choosing how its own signature is checked.
_ALGORITHMS_BY_KEY: dict[tuple[str, str | None], frozenset[str]] = {
    ("RSA", None): frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("EC", "P-521"): frozenset({"ES512"}),
    ("EC", "secp256k1"): frozenset({"ES256K"}),
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
    ("OKP", "Ed448"): frozenset({"EdDSA"}),
}
PUBLIC_KEY_ALGORITHMS: frozenset[str] = frozenset().union(*_ALGORITHMS_BY_KEY.values())


class JwtConfigError(ValueError):
    """The JWT settings or the JWKS file cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class VerificationKey:
    """One public key of the set, parsed once per algorithm it may verify."""

    kid: str | None
    kind: str  # "RSA", "EC P-256", "OKP Ed25519": for messages
    by_algorithm: dict[str, jwt.PyJWK]


@dataclass(frozen=True)
class KeySet:
    """The keys of one read of the JWKS file; replaced whole on reload."""

    keys: tuple[VerificationKey, ...]
    by_kid: dict[str, VerificationKey]


def load_key_set(path: Path, algorithms: tuple[str, ...]) -> KeySet:
    """Read and check a JWKS file; raise JwtConfigError naming the first problem.

    Each key is parsed here with PyJWK rather than with PyJWKSet, which skips keys
    it cannot parse: one mistyped key would then vanish silently and every token
    it signed would fail later as an 'unknown key id'."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JwtConfigError(f"JWKS file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise JwtConfigError(f"cannot read JWKS file {path}: {error}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise JwtConfigError(
            f"JWKS file {path} is not JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JwtConfigError(f'JWKS file {path} must be a JSON object {{"keys": [...]}}')

    keys: list[VerificationKey] = []
    for position, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise JwtConfigError(f"JWKS file {path}: key #{position} is not a JSON object")
        # Encryption keys may sit in an issuer's published set; they sign nothing.
        if entry.get("use") == "enc":
            continue
        keys.append(parse_key(entry, f"JWKS file {path}: key #{position}", algorithms))
    if not keys:
        raise JwtConfigError(f"JWKS file {path} holds no signing keys")

    by_kid: dict[str, VerificationKey] = {}
    for key in keys:
        if key.kid is None:
            if len(keys) > 1:
                raise JwtConfigError(
                    f"JWKS file {path}: the {key.kind} key has no kid; with more than one "
                    "key each needs a kid so tokens can name theirs"
                )
            continue
        if key.kid in by_kid:
            raise JwtConfigError(f"JWKS file {path}: kid {key.kid!r} is used by two keys")
        by_kid[key.kid] = key
    return KeySet(keys=tuple(keys), by_kid=by_kid)


def parse_key(entry: dict[str, Any], where: str, allowed: tuple[str, ...]) -> VerificationKey:
    """One JWK as a verification key for each allowed algorithm its type fits."""
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JwtConfigError(f"{where}: kid must be a string")
    if kid is not None:
        where = f"{where} (kid {kid!r})"
    # Any: these come from the file and are compared, never trusted to be strings.
    kty: Any = entry.get("kty")
    crv: Any = entry.get("crv")
    if kty == "oct":
        raise JwtConfigError(f"{where} is a shared secret (kty oct); only public keys are accepted")
    # A verifier needs only the public half; a private key here means a file meant
    # for the issuer was copied, and its secret now sits on this server.
    if "d" in entry:
        raise JwtConfigError(f"{where} holds a private key ('d'); publish only the public key")
    if not isinstance(kty, str) or not isinstance(crv, str | None):
        raise JwtConfigError(f"{where}: kty and crv must be strings")
    fitting = _ALGORITHMS_BY_KEY.get((kty, None) if kty == "RSA" else (kty, crv))
    if fitting is None:
        raise JwtConfigError(f"{where}: unsupported key type kty={kty!r} crv={crv!r}")
    kind = str(kty) if kty == "RSA" else f"{kty} {crv}"

    declared = entry.get("alg")
    if declared is not None:
        if not isinstance(declared, str):
            raise JwtConfigError(f"{where}: alg must be a string")
        if declared not in fitting:
            raise JwtConfigError(
                f"{where}: alg {declared!r} does not fit its {kind} key ({listed(fitting)})"
            )
        if declared not in allowed:
            raise JwtConfigError(
                f"{where}: its alg {declared} is not among the allowed algorithms {listed(allowed)}"
            )
        usable = [declared]
    else:
        usable = [algorithm for algorithm in allowed if algorithm in fitting]
        if not usable:
            raise JwtConfigError(
                f"{where}: its {kind} key verifies {listed(fitting)}, none of which is "
                f"among the allowed algorithms {listed(allowed)}"
            )

    by_algorithm: dict[str, jwt.PyJWK] = {}
    for algorithm in usable:
        try:
            by_algorithm[algorithm] = jwt.PyJWK(entry, algorithm)
        # PyJWT wraps most bad key material in InvalidKeyError; the rest must still
        # surface as a config error naming the key, not as a crash at startup.
        except (jwt.PyJWTError, ValueError, TypeError, LookupError) as error:
            raise JwtConfigError(f"{where} is not a usable {kind} key: {error}") from None
    first = next(iter(by_algorithm.values()))
    too_short = first.Algorithm.check_key_length(first.key)
    if too_short:
        raise JwtConfigError(f"{where}: {too_short}")
    return VerificationKey(kid=kid, kind=kind, by_algorithm=by_algorithm)


def listed(items: Any) -> str:
    """Items sorted and comma-separated, for messages."""
    return ", ".join(sorted(str(item) for item in items)) or "none"
