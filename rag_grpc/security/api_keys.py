"""API keys: random keys we generate, handed out once and stored only as their
SHA-256 hash in the policy; a presented key is identified by its hash.

Hashing with plain SHA-256 rather than a slow KDF (bcrypt, scrypt, Argon2) is
deliberate: a slow KDF protects guessable secrets such as passwords, whereas a
key here carries 256 random bits, so no amount of hashing speed makes searching
for it feasible, and a fast hash keeps every authenticated call cheap and lets a
key be found by a dictionary lookup instead of a KDF run per stored entry."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime

from rag_grpc.errors import Unauthenticated
from rag_grpc.security.identity import Identity
from rag_grpc.security.model import ApiKeyEntry

API_KEY_PREFIX = "rag_"
# Keys we issue are 47 characters ("rag_" + 43 of base64url); anything shorter
# than 32 is not one of ours and is refused before it is hashed, and anything
# longer than 256 is not worth hashing either.
_MIN_KEY_CHARS = 32
_MAX_KEY_CHARS = 256
_KEY_BYTES = 32

# Names end up in principals ("apikey:<name>") and policy files; lowercase only,
# so "CI" and "ci" cannot be two principals that look alike.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_HASH = re.compile(r"sha256:[0-9a-f]{64}")


class ApiKeyConfigError(ValueError):
    """An API key entry of the policy cannot be used; the message says what to fix."""


def api_key_hash(key: str) -> str:
    """The stored form of a key: "sha256:" and the hex SHA-256 of its UTF-8 text."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_api_key(name: str, expires: datetime | None = None) -> tuple[str, ApiKeyEntry]:
    """A fresh key for `name`: the key text, to hand to its user once and never
    store, and the entry holding its hash, to put in the policy."""
    _check_name(name)
    _check_expires(name, expires)
    key = API_KEY_PREFIX + secrets.token_urlsafe(_KEY_BYTES)
    return key, ApiKeyEntry(name=name, hash=api_key_hash(key), expires=expires)


class ApiKeys:
    """The valid API keys, by hash. Two entries may share a name (a rotation:
    old and new key both work until the old entry is removed); two may not share
    a hash."""

    def __init__(self, entries: Iterable[ApiKeyEntry]) -> None:
        by_hash: dict[str, ApiKeyEntry] = {}
        for entry in entries:
            _check_name(entry.name)
            if not isinstance(entry.hash, str) or not _HASH.fullmatch(entry.hash):
                raise ApiKeyConfigError(
                    f"API key {entry.name!r}: hash must be 'sha256:' followed by 64 lowercase "
                    "hex digits, as `new_api_key` writes it"
                )
            _check_expires(entry.name, entry.expires)
            earlier = by_hash.get(entry.hash)
            if earlier is not None:
                raise ApiKeyConfigError(
                    f"API keys {earlier.name!r} and {entry.name!r} have the same hash; "
                    "each entry must be a different key"
                )
            by_hash[entry.hash] = entry
        self._by_hash = by_hash

    def __len__(self) -> int:
        return len(self._by_hash)

    def identify(self, key: str, now: datetime | None = None) -> Identity | None:
        """The identity of a valid key; None when the key is not one of ours.
        Raises Unauthenticated when it is ours but expired, since whoever holds
        the key is best told that it expired and when."""
        if not (
            _MIN_KEY_CHARS <= len(key) <= _MAX_KEY_CHARS
            and key.startswith(API_KEY_PREFIX)
            and key.isascii()  # ours are base64url; this also keeps encode() from failing
        ):
            return None
        digest = api_key_hash(key)
        # The lookup is what makes identification one step whatever the number of
        # keys. Its timing can only reveal something about the hash of the presented
        # key, which does not help anyone find a valid key; compare_digest then
        # confirms the match in constant time.
        entry = self._by_hash.get(digest)
        if entry is None or not hmac.compare_digest(entry.hash, digest):
            return None
        if entry.expires is not None:
            current = datetime.now(UTC) if now is None else now
            if current.tzinfo is None:
                raise ValueError("now must be timezone-aware")
            if current >= entry.expires:
                raise Unauthenticated(
                    f"API key {entry.name!r} expired at "
                    f"{entry.expires.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}; ask for a new key"
                )
        return Identity(principal=f"apikey:{entry.name}", source="api_key")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ApiKeyConfigError(
            f"API key name {name!r} must be 1 to 63 lowercase letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )


def _check_expires(name: str, expires: object) -> None:
    # TOML's "2027-01-01" is a date and "2027-01-01T00:00:00" a naive datetime;
    # neither says when in UTC the key stops working, and a naive one would fail
    # the comparison only when the key is first used.
    if expires is None:
        return
    if not isinstance(expires, datetime) or expires.tzinfo is None:
        raise ApiKeyConfigError(
            f"API key {name!r}: expires must be a date and time with a zone, "
            f"e.g. 2027-01-01T00:00:00Z, got {expires!r}"
        )
