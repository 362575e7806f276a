"""The policy file: what a valid one becomes, each way a broken one is
refused, who gets which grant, and reloads (by call and by SIGHUP) that keep
the old policy when the new file is broken.

One file: all of it is security/policy.py's contract, and most of its length
is one table (`BROKEN`) of broken files with the message each is refused with."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rag_grpc.security.identity import Identity
from rag_grpc.security.model import ApiKeyEntry, Budget, Grant, Prices, Quota, Role, Tenant
from rag_grpc.security.policy import (
    Policy,
    PolicyError,
    PolicyHolder,
    install_sighup,
    load_policy,
)

HASH_A = "sha256:" + "a" * 64
HASH_B = "sha256:" + "0123456789abcdef" * 4

EXAMPLE = f"""
[[tenants]]
name = "acme"
members = [
  {{ identity = "spiffe://example.org/acme/app", role = "writer" }},
  {{ identity = "spiffe://example.org/acme/dash", role = "reader" }},
  {{ identity = "apikey:acme-ci", role = "admin" }},
]
budget = {{ usd_per_day = 10.0, refuse_generation = true }}

# TOML 1.0 inline tables must fit on one line; a long quota reads better as a sub-table.
[tenants.quota]
documents = 100000
vectors = 400000
stored_bytes = 1000000000
namespaces = 20
requests_per_s = 50
generated_tokens_per_day = 200000

[[tenants]]
name = "globex_2"
members = [{{ identity = "spiffe://example.org/ops", role = "reader" }}]

[[operators]]
identity = "spiffe://example.org/ops"

[[api_keys]]
name = "acme-ci"
hash = "{HASH_A}"

[[api_keys]]
name = "acme-ci"
hash = "{HASH_B}"
expires = 2027-01-01T00:00:00Z

[prices]
embedding_tokens = 0.00000002
prompt_tokens = 0.0000005
completion_tokens = 0.0000015
searches = 0.00001
asks = 0.0001
stored_bytes_per_day = 0
"""

MINIMAL = """
[[tenants]]
name = "acme"
members = [{ identity = "spiffe://example.org/acme/app", role = "writer" }]
"""


def write(tmp_path: Path, text: str, name: str = "policy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_design_example_loads_to_these_values(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, EXAMPLE))
    assert policy.tenants["acme"] == Tenant(
        name="acme",
        members={
            "spiffe://example.org/acme/app": Role.WRITER,
            "spiffe://example.org/acme/dash": Role.READER,
            "apikey:acme-ci": Role.ADMIN,
        },
        quota=Quota(
            documents=100000,
            vectors=400000,
            stored_bytes=1000000000,
            namespaces=20,
            requests_per_s=50,
            generated_tokens_per_day=200000,
        ),
        budget=Budget(usd_per_day=10.0, refuse_generation=True),
    )
    assert policy.tenants["globex_2"].quota == Quota()
    assert policy.tenants["globex_2"].budget is None
    assert policy.operators == frozenset({"spiffe://example.org/ops"})
    assert policy.api_keys == (
        ApiKeyEntry("acme-ci", HASH_A, None),
        ApiKeyEntry("acme-ci", HASH_B, datetime(2027, 1, 1, tzinfo=UTC)),
    )
    assert policy.prices == Prices(
        embedding_tokens=0.00000002,
        prompt_tokens=0.0000005,
        completion_tokens=0.0000015,
        searches=0.00001,
        asks=0.0001,
        stored_bytes_per_day=0.0,
    )
    assert policy.tenant("acme") is policy.tenants["acme"]
    assert policy.tenant("nobody") is None


def test_a_file_of_operators_alone_is_valid(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, '[[operators]]\nidentity = "spiffe://x/ops"\n'))
    assert policy.tenants == {}
    assert policy.prices == Prices()


def test_an_api_key_member_without_a_key_entry_is_loaded_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = '[[tenants]]\nname = "acme"\nmembers = [{ identity = "apikey:ci", role = "admin" }]\n'
    with caplog.at_level(logging.WARNING, logger="rag_grpc.security.policy"):
        load_policy(write(tmp_path, text))
    assert "no [[api_keys]] entry has that name" in caplog.text


TENANT = '[[tenants]]\nname = "acme"\n'

# (file text, the words the error must contain besides the file's path)
BROKEN = {
    "empty file": ("", "the policy is empty"),
    "only prices": ("[prices]\nasks = 1.0\n", "the policy is empty"),
    "not TOML": ("[[tenants]\n", "not valid TOML"),
    "unknown top-level key": ("tenant = 1\n" + MINIMAL, "top level: unknown key 'tenant'"),
    "unknown tenant key": (
        TENANT + "memebers = []\n",
        "tenants[0] ('acme'): unknown key 'memebers'; allowed: name, members, quota, budget",
    ),
    "unknown member key": (
        TENANT + 'members = [{ identity = "x", role = "reader", tenant = "b" }]\n',
        "tenants[0] ('acme'): members[0]: unknown key 'tenant'",
    ),
    "unknown quota key": (
        TENANT + "quota = { document = 5 }\n",
        "tenants[0] ('acme'): quota: unknown key 'document'",
    ),
    "unknown budget key": (
        TENANT + "budget = { usd_per_day = 1.0, refuse = true }\n",
        "tenants[0] ('acme'): budget: unknown key 'refuse'",
    ),
    "unknown operator key": (
        '[[operators]]\nidentity = "x"\nrole = "admin"\n',
        "operators[0]: unknown key 'role'",
    ),
    "unknown api key key": (
        MINIMAL + f'[[api_keys]]\nname = "ci"\nhash = "{HASH_A}"\nkey = "s3cret"\n',
        "api_keys[0] ('ci'): unknown key 'key'",
    ),
    "unknown price": (MINIMAL + "[prices]\nsearch = 0.1\n", "prices: unknown key 'search'"),
    "tenants not an array of tables": ('tenants = "acme"\n', "tenants: must be an array of tables"),
    "prices not a table": ("prices = 3\n" + MINIMAL, "prices: must be a table"),
    "tenant without name": ("[[tenants]]\nmembers = []\n", "tenants[0]: name is required"),
    "tenant name not a string": ("[[tenants]]\nname = 7\n", "name must be a non-empty string"),
    "tenant name uppercase": (
        '[[tenants]]\nname = "Acme"\n',
        "tenants[0]: tenant name 'Acme' must match",
    ),
    "tenant name with ~": ('[[tenants]]\nname = "a~b"\n', "tenant name 'a~b' must match"),
    "tenant name too long": (f'[[tenants]]\nname = "{"a" * 64}"\n', "must match"),
    "duplicate tenant": (
        TENANT + TENANT,
        "tenants[1]: tenant 'acme' is defined more than once",
    ),
    "unknown role": (
        TENANT + 'members = [{ identity = "x", role = "owner" }]\n',
        "members[0]: role 'owner' is not one of reader, writer, admin",
    ),
    "role as a number": (
        TENANT + 'members = [{ identity = "x", role = 3 }]\n',
        "role must be a non-empty string, got 3",
    ),
    "member without identity": (
        TENANT + 'members = [{ role = "reader" }]\n',
        "members[0]: identity is required",
    ),
    "identity with spaces": (
        TENANT + 'members = [{ identity = "x ", role = "reader" }]\n',
        "identity 'x ' has leading or trailing spaces",
    ),
    "member twice in one tenant": (
        TENANT + 'members = [{ identity = "x", role = "reader" },'
        ' { identity = "x", role = "admin" }]\n',
        "members[1]: 'x' is listed twice in this tenant",
    ),
    "member of two tenants": (
        TENANT
        + 'members = [{ identity = "x", role = "reader" }]\n'
        + '[[tenants]]\nname = "globex"\nmembers = [{ identity = "x", role = "admin" }]\n',
        "tenants[1] ('globex'): 'x' is already a member of tenant 'acme'",
    ),
    "negative quota": (
        TENANT + "quota = { documents = -1 }\n",
        "quota: documents must not be negative, got -1",
    ),
    "fractional document quota": (
        TENANT + "quota = { documents = 1.5 }\n",
        "documents must be a whole number, got 1.5",
    ),
    "boolean quota": (TENANT + "quota = { vectors = true }\n", "vectors must be a number"),
    "infinite rate": (TENANT + "quota = { requests_per_s = inf }\n", "must be finite"),
    "quota not a table": (TENANT + "quota = 5\n", "tenants[0] ('acme'): quota: must be a table"),
    "budget without amount": (
        TENANT + "budget = { refuse_generation = true }\n",
        "budget: usd_per_day is required",
    ),
    "budget refuse not a bool": (
        TENANT + 'budget = { usd_per_day = 1, refuse_generation = "yes" }\n',
        "refuse_generation must be true or false",
    ),
    "negative price": (MINIMAL + "[prices]\nasks = -0.1\n", "prices: asks must not be negative"),
    "price as string": (MINIMAL + '[prices]\nasks = "0.1"\n', "asks must be a number"),
    "operator twice": (
        '[[operators]]\nidentity = "o"\n[[operators]]\nidentity = "o"\n',
        "operators[1]: operator 'o' is listed more than once",
    ),
    "hash without prefix": (
        MINIMAL + f'[[api_keys]]\nname = "ci"\nhash = "{"a" * 64}"\n',
        "api_keys[0] ('ci'): hash must be \"sha256:\" followed by 64 lowercase hex digits",
    ),
    "hash uppercase": (
        MINIMAL + f'[[api_keys]]\nname = "ci"\nhash = "sha256:{"A" * 64}"\n',
        "hash must be",
    ),
    "hash too short": (
        MINIMAL + f'[[api_keys]]\nname = "ci"\nhash = "sha256:{"a" * 63}"\n',
        "hash must be",
    ),
    "api key without name": (
        MINIMAL + f'[[api_keys]]\nhash = "{HASH_A}"\n',
        "api_keys[0]: name is required",
    ),
    "api key name with space": (
        MINIMAL + f'[[api_keys]]\nname = "a b"\nhash = "{HASH_A}"\n',
        "key name 'a b' must not contain whitespace",
    ),
    "same key twice": (
        MINIMAL + f'[[api_keys]]\nname = "ci"\nhash = "{HASH_A}"\n' * 2,
        "api_keys[1]: key 'ci' with this hash is listed twice",
    ),
    "expires as a date": (
        MINIMAL + f'[[api_keys]]\nname = "ci"\nhash = "{HASH_A}"\nexpires = 2027-01-01\n',
        "expires must be a date-time with a timezone (e.g. 2027-01-01T00:00:00Z), got a date",
    ),
    "expires without timezone": (
        MINIMAL + f'[[api_keys]]\nname = "ci"\nhash = "{HASH_A}"\nexpires = 2027-01-01T00:00:00\n',
        "got a date-time without a timezone",
    ),
    "expires as a string": (
        MINIMAL + f'[[api_keys]]\nname = "ci"\nhash = "{HASH_A}"\nexpires = "2027-01-01"\n',
        "got '2027-01-01'",
    ),
}


@pytest.mark.parametrize(("text", "message"), BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_policy_is_refused_with_a_message_naming_file_entry_and_fault(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_pasted_raw_key_is_not_echoed_in_the_error(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '[[api_keys]]\nname = "ci"\nhash = "rag_s3cret_key"\n')
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert "s3cret" not in str(info.value)


def test_a_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(tmp_path / "absent.toml")


# Grants ---------------------------------------------------------------------

APP = "spiffe://example.org/acme/app"
OPS = "spiffe://example.org/ops"


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return load_policy(write(tmp_path, EXAMPLE))


@pytest.mark.parametrize(
    ("identity", "grant"),
    [
        (Identity(APP, "mtls"), Grant("acme", Role.WRITER, False)),
        (Identity("apikey:acme-ci", "api_key"), Grant("acme", Role.ADMIN, False)),
        # The JWT's tenant claim agrees with the membership.
        (Identity(APP, "jwt", tenant="acme"), Grant("acme", Role.WRITER, False)),
        # A claim naming another tenant (even a real one) gives no role anywhere.
        (Identity(APP, "jwt", tenant="globex_2"), Grant(None, None, False)),
        (Identity(APP, "jwt", tenant="nowhere"), Grant(None, None, False)),
        # Unlisted identities get nothing, with or without a claim: no tenant is created.
        (Identity("someone", "jwt", tenant="newco"), Grant(None, None, False)),
        (Identity("spiffe://example.org/acme/APP", "mtls"), Grant(None, None, False)),
        # An operator may also be a member of one tenant.
        (Identity(OPS, "mtls"), Grant("globex_2", Role.READER, True)),
        # A mismatched claim drops the membership but not the operator status,
        # which the policy gives by principal alone.
        (Identity(OPS, "jwt", tenant="acme"), Grant(None, None, True)),
    ],
    ids=repr,
)
def test_grants(policy: Policy, identity: Identity, grant: Grant) -> None:
    assert policy.grant(identity) == grant


def test_a_policy_built_in_code_refuses_a_member_of_two_tenants() -> None:
    with pytest.raises(ValueError, match="member of tenants 'a' and 'b'"):
        Policy(
            tenants={
                "a": Tenant("a", {"x": Role.READER}),
                "b": Tenant("b", {"x": Role.ADMIN}),
            }
        )


# The holder and reloads -----------------------------------------------------


def test_a_broken_file_at_start_stops_the_holder(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="not valid TOML"):
        PolicyHolder(write(tmp_path, "[[tenants]\n"))


def test_reload_puts_a_good_file_in_force_and_logs_counts_not_secrets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, MINIMAL)
    holder = PolicyHolder(path)
    assert set(holder.current.tenants) == {"acme"}
    path.write_text(EXAMPLE)
    with caplog.at_level(logging.INFO, logger="rag_grpc.security.policy"):
        assert holder.reload() is None
    assert set(holder.current.tenants) == {"acme", "globex_2"}
    assert "tenants added: globex_2" in caplog.text
    assert "tenants changed: acme" in caplog.text
    assert "2 API keys" in caplog.text
    for secret in (HASH_A, HASH_B, APP, OPS):
        assert secret not in caplog.text


def test_reload_of_a_broken_file_keeps_the_old_policy_and_returns_the_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, EXAMPLE)
    holder = PolicyHolder(path)
    before = holder.current
    path.write_text(EXAMPLE + '\n[[tenants]]\nname = "acme"\n')
    with caplog.at_level(logging.ERROR, logger="rag_grpc.security.policy"):
        error = holder.reload()
    assert error is not None
    assert "tenant 'acme' is defined more than once" in error
    assert holder.current is before
    assert "previous policy stays in force" in caplog.text
    path.unlink()
    error = holder.reload()
    assert error is not None and "cannot read the policy file" in error
    assert holder.current is before


def test_concurrent_reloads_and_reads_always_see_a_whole_policy(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    holder = PolicyHolder(path)
    seen: set[frozenset[str]] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(frozenset(holder.current.tenants))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for thread in readers:
        thread.start()
    reloaders = [threading.Thread(target=holder.reload) for _ in range(4)]
    for thread in reloaders:
        thread.start()
    for thread in reloaders:
        thread.join()
    stop.set()
    for thread in readers:
        thread.join()
    assert seen == {frozenset({"acme", "globex_2"})}


def test_sighup_reloads_the_policy(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    holder = PolicyHolder(path)
    results: list[str | None] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reloaded = asyncio.Event()

        def on_reload(error: str | None) -> None:
            results.append(error)
            reloaded.set()

        install_sighup(loop, holder, on_reload)
        try:
            path.write_text(EXAMPLE)
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.wait_for(reloaded.wait(), timeout=10)
            assert set(holder.current.tenants) == {"acme", "globex_2"}

            # A broken file on the next signal: reported, old policy kept.
            reloaded.clear()
            good = holder.current
            path.write_text("[[tenants]]\nname = 'Bad'\n")
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.wait_for(reloaded.wait(), timeout=10)
            assert holder.current is good
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    asyncio.run(main())
    assert results[0] is None
    assert results[1] is not None and "tenant name 'Bad' must match" in results[1]
