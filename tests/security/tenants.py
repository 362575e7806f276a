"""Tenants for the tests that call a real server as one of its members: a
member with an API key made for the test, the policy file that lists such
members, and a client that calls as one."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rag_grpc.client import RagClient
from rag_grpc.security.api_keys import new_api_key
from tests.conftest import ServerThread


@dataclass(frozen=True)
class Member:
    """A policy member identified by an API key made for the test."""

    tenant: str | None  # None: an operator, or nobody's member
    role: str | None
    name: str
    key: str
    hash: str


def member(tenant: str | None, role: str | None, name: str) -> Member:
    """A member with a fresh API key of this name."""
    key, entry = new_api_key(name)
    return Member(tenant, role, name, key, entry.hash)


def write_policy(
    path: Path,
    members: Iterable[Member],
    *,
    operators: Iterable[Member] = (),
    quotas: dict[str, dict[str, float]] | None = None,
    budgets: dict[str, dict[str, object]] | None = None,
    prices: dict[str, float] | None = None,
) -> Path:
    """A policy file (TOML) with the members' tenants, roles and API keys."""
    members = list(members)
    operators = list(operators)
    tenants: dict[str, list[Member]] = {}
    for m in members:
        if m.tenant is not None:
            tenants.setdefault(m.tenant, []).append(m)
    for name in quotas or {}:
        tenants.setdefault(name, [])
    lines: list[str] = []
    for name, listed in tenants.items():
        lines += ["[[tenants]]", f'name = "{name}"']
        for m in listed:
            lines += ["[[tenants.members]]", f'identity = "apikey:{m.name}"', f'role = "{m.role}"']
        quota = (quotas or {}).get(name)
        if quota:
            lines.append("[tenants.quota]")
            lines += [f"{k} = {v}" for k, v in quota.items()]
        budget = (budgets or {}).get(name)
        if budget:
            lines.append("[tenants.budget]")
            lines += [f"{k} = {str(v).lower()}" for k, v in budget.items()]
    for op in operators:
        lines += ["[[operators]]", f'identity = "apikey:{op.name}"']
    for m in [*members, *operators]:
        lines += ["[[api_keys]]", f'name = "{m.name}"', f'hash = "{m.hash}"']
    if prices:
        lines.append("[prices]")
        lines += [f"{k} = {v}" for k, v in prices.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def client(server: ServerThread, who: Member | None) -> RagClient:
    """A client of ``server`` that calls as ``who`` (its API key), or with no credentials."""
    return RagClient(server.target, timeout=30, token=who.key if who else None)
