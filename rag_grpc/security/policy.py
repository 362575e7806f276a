"""The policy file: tenants and their members, operators, API keys and
prices, loaded strictly from TOML (a typo neither grants nor drops a
permission) and swapped atomically on reload. The `Policy` value it yields
lives in model.py."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import signal
import threading
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import fields
from datetime import date, datetime
from pathlib import Path
from typing import Any

from rag_grpc.security.model import (
    TENANT_NAME,
    ApiKeyEntry,
    Budget,
    Policy,
    Prices,
    Quota,
    Role,
    Tenant,
)

# Policy and TENANT_NAME are imported from here by older code.
__all__ = [
    "KEY_HASH",
    "ROLES",
    "TENANT_NAME",
    "Policy",
    "PolicyError",
    "PolicyHolder",
    "install_sighup",
    "load_policy",
]

log = logging.getLogger(__name__)

KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
ROLES = {role.name.lower(): role for role in Role}

# Quota fields counted in whole units; requests_per_s alone may be fractional.
_INT_QUOTA_FIELDS = frozenset(
    {"documents", "vectors", "stored_bytes", "namespaces", "generated_tokens_per_day"}
)


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the file, the entry
    and what is wrong with it."""


def load_policy(path: Path) -> Policy:
    """Read and check the policy file; any unknown key, wrong type or
    contradiction raises PolicyError, because a typo must neither grant nor
    silently drop a permission."""
    try:
        with path.open("rb") as stream:
            document = tomllib.load(stream)
    except OSError as error:
        raise PolicyError(f"{path}: cannot read the policy file: {error.strerror}") from error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise PolicyError(f"{path}: not valid TOML: {error}") from error
    return _Parser(path).policy(document)


class _Parser:
    """Turns the parsed TOML document into a Policy, naming the file and the
    entry in every error."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, what: str) -> PolicyError:
        return PolicyError(f"{self.path}: {where}: {what}" if where else f"{self.path}: {what}")

    def policy(self, document: dict[str, Any]) -> Policy:
        self.keys(document, "", allowed=("tenants", "operators", "api_keys", "prices"))
        raw_tenants = self.tables(document, "tenants")
        raw_operators = self.tables(document, "operators")
        if not raw_tenants and not raw_operators:
            raise self.fail(
                "", "the policy is empty: it needs at least one [[tenants]] or [[operators]] entry"
            )

        tenants: dict[str, Tenant] = {}
        member_of: dict[str, str] = {}
        for index, raw in enumerate(raw_tenants):
            tenant = self.tenant(raw, f"tenants[{index}]")
            if tenant.name in tenants:
                raise self.fail(
                    f"tenants[{index}]", f"tenant {tenant.name!r} is defined more than once"
                )
            for principal in tenant.members:
                if principal in member_of:
                    raise self.fail(
                        f"tenants[{index}] ({tenant.name!r})",
                        f"{principal!r} is already a member of tenant {member_of[principal]!r};"
                        " an identity may belong to one tenant only",
                    )
                member_of[principal] = tenant.name
            tenants[tenant.name] = tenant

        operators: set[str] = set()
        for index, raw in enumerate(raw_operators):
            where = f"operators[{index}]"
            self.keys(raw, where, allowed=("identity",))
            principal = self.identity(raw, where)
            if principal in operators:
                raise self.fail(where, f"operator {principal!r} is listed more than once")
            operators.add(principal)

        api_keys = tuple(
            self.api_key(raw, f"api_keys[{index}]")
            for index, raw in enumerate(self.tables(document, "api_keys"))
        )
        seen_keys: set[tuple[str, str]] = set()
        for index, entry in enumerate(api_keys):
            if (entry.name, entry.hash) in seen_keys:
                raise self.fail(
                    f"api_keys[{index}]", f"key {entry.name!r} with this hash is listed twice"
                )
            seen_keys.add((entry.name, entry.hash))

        prices = self.prices(document.get("prices", {}), "prices")
        self.warn_unmatched_keys(tenants, api_keys)
        return Policy(
            tenants=tenants,
            operators=frozenset(operators),
            api_keys=api_keys,
            prices=prices,
        )

    def tenant(self, raw: dict[str, Any], where: str) -> Tenant:
        self.keys(raw, self.named(raw, where), allowed=("name", "members", "quota", "budget"))
        name = self.string(raw, "name", where)
        if not TENANT_NAME.fullmatch(name):
            raise self.fail(
                where,
                f"tenant name {name!r} must match {TENANT_NAME.pattern}"
                " (lowercase letters, digits, '_' and '-', at most 63 characters)",
            )
        where = f"{where} ({name!r})"
        members: dict[str, Role] = {}
        for index, member in enumerate(self.tables(raw, "members", where)):
            member_where = f"{where}: members[{index}]"
            self.keys(member, member_where, allowed=("identity", "role"))
            principal = self.identity(member, member_where)
            role_name = self.string(member, "role", member_where)
            role = ROLES.get(role_name)
            if role is None:
                raise self.fail(
                    member_where, f"role {role_name!r} is not one of {', '.join(ROLES)}"
                )
            if principal in members:
                raise self.fail(member_where, f"{principal!r} is listed twice in this tenant")
            members[principal] = role
        quota = self.quota(self.table(raw, "quota", where), f"{where}: quota")
        budget = None
        if "budget" in raw:
            budget = self.budget(self.table(raw, "budget", where), f"{where}: budget")
        return Tenant(name=name, members=members, quota=quota, budget=budget)

    def quota(self, raw: dict[str, Any], where: str) -> Quota:
        names = [f.name for f in fields(Quota)]
        self.keys(raw, where, allowed=names)
        values: dict[str, int | float] = {}
        for name in names:
            if name in raw:
                values[name] = self.number(raw, name, where, integer=name in _INT_QUOTA_FIELDS)
        return Quota(**values)  # type: ignore[arg-type]  # each field checked by name above

    def budget(self, raw: dict[str, Any], where: str) -> Budget:
        self.keys(raw, where, allowed=("usd_per_day", "refuse_generation"))
        if "usd_per_day" not in raw:
            raise self.fail(where, "usd_per_day is required")
        usd = float(self.number(raw, "usd_per_day", where))
        refuse = raw.get("refuse_generation", False)
        if not isinstance(refuse, bool):
            raise self.fail(where, f"refuse_generation must be true or false, got {refuse!r}")
        return Budget(usd_per_day=usd, refuse_generation=refuse)

    def prices(self, raw: object, where: str) -> Prices:
        if not isinstance(raw, dict):
            raise self.fail(where, "must be a table ([prices])")
        names = [f.name for f in fields(Prices)]
        self.keys(raw, where, allowed=names)
        return Prices(**{name: float(self.number(raw, name, where)) for name in raw})

    def api_key(self, raw: dict[str, Any], where: str) -> ApiKeyEntry:
        self.keys(raw, self.named(raw, where), allowed=("name", "hash", "expires"))
        name = self.string(raw, "name", where)
        if any(c.isspace() for c in name):
            raise self.fail(where, f"key name {name!r} must not contain whitespace")
        where = f"{where} ({name!r})"
        key_hash = self.string(raw, "hash", where)
        if not KEY_HASH.match(key_hash):
            # Never echo the value: a pasted raw key here would end up in logs.
            raise self.fail(where, 'hash must be "sha256:" followed by 64 lowercase hex digits')
        expires = raw.get("expires")
        # tomllib gives a date for 2027-01-01 and a naive datetime for a local
        # date-time; both would be compared against an unknown clock.
        if expires is not None and (not isinstance(expires, datetime) or expires.tzinfo is None):
            if isinstance(expires, datetime):
                kind = "a date-time without a timezone"
            elif isinstance(expires, date):
                kind = "a date"
            else:
                kind = repr(expires)
            raise self.fail(
                where,
                "expires must be a date-time with a timezone (e.g. 2027-01-01T00:00:00Z),"
                f" got {kind}",
            )
        return ApiKeyEntry(name=name, hash=key_hash, expires=expires)

    def warn_unmatched_keys(
        self, tenants: Mapping[str, Tenant], api_keys: tuple[ApiKeyEntry, ...]
    ) -> None:
        # Not an error (a key may be provisioned before its member), but a
        # misspelled name would otherwise leave a key that silently grants nothing.
        key_names = {entry.name for entry in api_keys}
        for tenant in tenants.values():
            for principal in tenant.members:
                if principal.startswith("apikey:") and principal[7:] not in key_names:
                    log.warning(
                        "%s: tenant %r lists %r but no [[api_keys]] entry has that name",
                        self.path,
                        tenant.name,
                        principal,
                    )

    # Small typed accessors -------------------------------------------------

    def named(self, raw: Mapping[str, Any], where: str) -> str:
        """where, with the entry's name when it has a usable one, so an error
        in the fifth tenant says which tenant that is."""
        name = raw.get("name")
        return f"{where} ({name!r})" if isinstance(name, str) and name else where

    def keys(
        self, raw: Mapping[str, Any], where: str, allowed: tuple[str, ...] | list[str]
    ) -> None:
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise self.fail(
                where or "top level",
                f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))};"
                f" allowed: {', '.join(allowed)}",
            )

    def tables(self, raw: dict[str, Any], key: str, where: str = "") -> list[dict[str, Any]]:
        value = raw.get(key, [])
        label = f"{where}: {key}" if where else key
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise self.fail(label, "must be an array of tables")
        return value

    def table(self, raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(f"{where}: {key}", f"must be a table, got {value!r}")
        return value

    def string(self, raw: dict[str, Any], key: str, where: str) -> str:
        value = raw.get(key)
        if value is None:
            raise self.fail(where, f"{key} is required")
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"{key} must be a non-empty string, got {value!r}")
        return value

    def identity(self, raw: dict[str, Any], where: str) -> str:
        principal = self.string(raw, "identity", where)
        if principal != principal.strip():
            # Principals are compared exactly; stray spaces would never match.
            raise self.fail(where, f"identity {principal!r} has leading or trailing spaces")
        return principal

    def number(
        self, raw: Mapping[str, Any], key: str, where: str, integer: bool = False
    ) -> int | float:
        value = raw[key]
        # bool is an int subclass: `documents = true` must not read as 1.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(where, f"{key} must be a number, got {value!r}")
        if integer and not isinstance(value, int):
            raise self.fail(where, f"{key} must be a whole number, got {value!r}")
        if not math.isfinite(value):
            raise self.fail(where, f"{key} must be finite, got {value!r}")
        if value < 0:
            raise self.fail(where, f"{key} must not be negative, got {value!r}")
        return value


class PolicyHolder:
    """The policy in force, loaded from a file at construction (a broken file
    raises, so a server cannot start on it) and replaced by reload()."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Readers take self._policy without the lock: rebinding one attribute
        # is atomic, so a reader sees the old or the new policy, never a mix.
        self._policy = load_policy(path)
        self._reload_lock = threading.Lock()
        log.info("policy %s loaded: %s", path, _summary(self._policy))

    @property
    def current(self) -> Policy:
        """The policy in force now."""
        return self._policy

    def reload(self) -> str | None:
        """Load the file again and put it in force; on error keep the policy
        in force and return the error text (None on success)."""
        # Serialized so two reloads cannot log their change against the same
        # old policy or finish in the wrong order.
        with self._reload_lock:
            try:
                new = load_policy(self.path)
            except PolicyError as error:
                log.error("policy reload failed, the previous policy stays in force: %s", error)
                return str(error)
            old, self._policy = self._policy, new
        log.info("policy %s reloaded: %s", self.path, _changes(old, new))
        return None


def install_sighup(
    loop: asyncio.AbstractEventLoop,
    holder: PolicyHolder,
    on_reload: Callable[[str | None], None] | None = None,
) -> None:
    """Reload the holder's policy when the process receives SIGHUP, then call
    on_reload with the error text (None on success)."""

    def handle() -> None:
        # Runs on the loop's thread; reading a small TOML file is brief and
        # rare enough not to need an executor.
        error = holder.reload()
        if on_reload is not None:
            on_reload(error)

    loop.add_signal_handler(signal.SIGHUP, handle)


def _summary(policy: Policy) -> str:
    members = sum(len(tenant.members) for tenant in policy.tenants.values())
    return (
        f"{len(policy.tenants)} tenants, {members} members, {len(policy.operators)} operators,"
        f" {len(policy.api_keys)} API keys"
    )


def _changes(old: Policy, new: Policy) -> str:
    # Counts and tenant names only: principals and key hashes stay out of logs.
    added = sorted(set(new.tenants) - set(old.tenants))
    removed = sorted(set(old.tenants) - set(new.tenants))
    changed = sorted(
        name
        for name in set(old.tenants) & set(new.tenants)
        if old.tenants[name] != new.tenants[name]
    )
    parts = [_summary(new)]
    if added:
        parts.append(f"tenants added: {', '.join(added)}")
    if removed:
        parts.append(f"tenants removed: {', '.join(removed)}")
    if changed:
        parts.append(f"tenants changed: {', '.join(changed)}")
    if old.operators != new.operators:
        parts.append(
            f"operators {len(new.operators & old.operators)} kept,"
            f" {len(new.operators - old.operators)} added,"
            f" {len(old.operators - new.operators)} removed"
        )
    if set(old.api_keys) != set(new.api_keys):
        parts.append(
            f"API keys {len(set(new.api_keys) - set(old.api_keys))} added,"
            f" {len(set(old.api_keys) - set(new.api_keys))} removed"
        )
    if old.prices != new.prices:
        parts.append("prices changed")
    if len(parts) == 1:
        parts.append("no change")
    return "; ".join(parts)
