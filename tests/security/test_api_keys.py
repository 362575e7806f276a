"""API keys: generated keys identify their name, stored only as hashes; wrong,
expired and malformed keys are refused, and bad policy entries are config errors."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

import pytest

from rag_grpc.errors import Unauthenticated
from rag_grpc.security import api_keys
from rag_grpc.security.api_keys import (
    ApiKeyConfigError,
    ApiKeys,
    api_key_hash,
    new_api_key,
)
from rag_grpc.security.identity import Identity
from rag_grpc.security.model import ApiKeyEntry


def test_a_new_key_identifies_its_name() -> None:
    key, entry = new_api_key("acme-ci")
    assert re.fullmatch(r"rag_[A-Za-z0-9_-]{43}", key)
    assert entry == ApiKeyEntry(name="acme-ci", hash=api_key_hash(key), expires=None)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", entry.hash)
    assert key not in entry.hash
    keys = ApiKeys([entry])
    assert keys.identify(key) == Identity(principal="apikey:acme-ci", source="api_key")


def test_keys_are_random() -> None:
    generated = {new_api_key("ci")[0] for _ in range(100)}
    assert len(generated) == 100


def test_a_wrong_key_is_unknown() -> None:
    key, entry = new_api_key("acme-ci")
    keys = ApiKeys([entry])
    other, _ = new_api_key("acme-ci")
    assert keys.identify(other) is None
    # One character changed.
    flipped = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert keys.identify(flipped) is None


def test_rotation_two_keys_one_principal() -> None:
    old_key, old_entry = new_api_key("acme-ci")
    new_key, new_entry = new_api_key("acme-ci")
    _, other_entry = new_api_key("globex-ci")
    keys = ApiKeys([old_entry, new_entry, other_entry])
    assert len(keys) == 3
    assert keys.identify(old_key) == keys.identify(new_key) == Identity("apikey:acme-ci", "api_key")
    # Dropping the old entry ends the rotation.
    keys = ApiKeys([new_entry, other_entry])
    assert keys.identify(old_key) is None
    assert keys.identify(new_key) == Identity("apikey:acme-ci", "api_key")


def test_expired_key_is_refused_with_its_expiry() -> None:
    expires = datetime(2027, 1, 1, tzinfo=UTC)
    key, entry = new_api_key("acme-ci", expires=expires)
    keys = ApiKeys([entry])
    before = expires - timedelta(seconds=1)
    assert keys.identify(key, now=before) == Identity("apikey:acme-ci", "api_key")
    for now in (expires, expires + timedelta(days=1)):
        with pytest.raises(Unauthenticated) as info:
            keys.identify(key, now=now)
        assert str(info.value) == (
            "API key 'acme-ci' expired at 2027-01-01T00:00:00Z; ask for a new key"
        )
        assert key not in str(info.value)
    # Without `now`, the clock decides.
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    stale_key, stale_entry = new_api_key("old", expires=long_ago)
    with pytest.raises(Unauthenticated, match="expired at 2020-01-01T00:00:00Z"):
        ApiKeys([stale_entry]).identify(stale_key)
    with pytest.raises(ValueError, match="timezone-aware"):
        keys.identify(key, now=datetime(2026, 1, 1))


def test_short_and_garbage_keys_are_refused_without_hashing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key, entry = new_api_key("acme-ci")
    keys = ApiKeys([entry])

    def no_hashing(key: str) -> str:
        raise AssertionError("a key that cannot be ours was hashed")

    monkeypatch.setattr(api_keys, "api_key_hash", no_hashing)
    for garbage in (
        "",
        "rag_",
        key[:31],  # right prefix, too short
        "xyz_" + key[4:],  # right length, wrong prefix
        key.upper(),  # "RAG_..."
        "rag_" + "é" * 43,
        "rag_" + "\udc80" * 43,  # would not even encode as UTF-8
        "rag_" + "A" * 300,
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
    ):
        assert keys.identify(garbage) is None, garbage


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (ApiKeyEntry("Acme-CI", "sha256:" + "0" * 64), "name 'Acme-CI' must be 1 to 63 lowercase"),
        (ApiKeyEntry("", "sha256:" + "0" * 64), "name '' must be"),
        (ApiKeyEntry("a" * 64, "sha256:" + "0" * 64), "must be 1 to 63"),
        (ApiKeyEntry("acme ci", "sha256:" + "0" * 64), "name 'acme ci'"),
        (ApiKeyEntry("acme-ci", "0" * 64), "hash must be 'sha256:' followed by 64 lowercase hex"),
        (ApiKeyEntry("acme-ci", "sha256:" + "A" * 64), "64 lowercase hex"),
        (ApiKeyEntry("acme-ci", "sha256:" + "0" * 63), "64 lowercase hex"),
        (ApiKeyEntry("acme-ci", "md5:" + "0" * 32), "64 lowercase hex"),
        (
            ApiKeyEntry("acme-ci", "sha256:" + "0" * 64, datetime(2027, 1, 1)),
            "expires must be a date and time with a zone, e.g. 2027-01-01T00:00:00Z",
        ),
        (
            ApiKeyEntry("acme-ci", "sha256:" + "0" * 64, date(2027, 1, 1)),  # type: ignore[arg-type]
            "expires must be a date and time with a zone",
        ),
    ],
)
def test_bad_entries_are_config_errors(entry: ApiKeyEntry, expected: str) -> None:
    with pytest.raises(ApiKeyConfigError, match=re.escape(expected)):
        ApiKeys([entry])


def test_the_same_hash_twice_is_a_config_error() -> None:
    _, entry = new_api_key("acme-ci")
    with pytest.raises(ApiKeyConfigError, match="'acme-ci' and 'globex-ci' have the same hash"):
        ApiKeys([entry, ApiKeyEntry("globex-ci", entry.hash)])


def test_new_api_key_checks_its_arguments() -> None:
    with pytest.raises(ApiKeyConfigError, match="name 'CI'"):
        new_api_key("CI")
    with pytest.raises(ApiKeyConfigError, match="with a zone"):
        new_api_key("ci", expires=datetime(2027, 1, 1))
