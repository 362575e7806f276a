"""The values the policy is made of and the other security modules share:
roles, a tenant's quota and budget, prices, API key entries and the grant
an identity receives."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class Role(enum.IntEnum):
    """A member's role in its tenant; each includes the ones below it."""

    READER = 1
    WRITER = 2
    ADMIN = 3


@dataclass(frozen=True)
class Quota:
    """A tenant's limits; None means unlimited."""

    documents: int | None = None
    vectors: int | None = None
    stored_bytes: int | None = None
    namespaces: int | None = None
    requests_per_s: float | None = None
    generated_tokens_per_day: int | None = None


@dataclass(frozen=True)
class Budget:
    """Estimated spend per UTC day past which a metric fires and, when
    refuse_generation is set, generation is refused."""

    usd_per_day: float
    refuse_generation: bool = False


@dataclass(frozen=True)
class Prices:
    """USD per unit of usage, to estimate cost; 0 where not priced."""

    embedding_tokens: float = 0.0
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    searches: float = 0.0
    asks: float = 0.0
    stored_bytes_per_day: float = 0.0


@dataclass(frozen=True)
class ApiKeyEntry:
    """One valid API key, stored as "sha256:<hex>" of the key, never the key.
    Two entries with one name are a rotation: both are valid until one is removed."""

    name: str
    hash: str
    expires: datetime | None = None


@dataclass(frozen=True)
class Tenant:
    """A tenant: its members' roles by principal, its quota and its budget."""

    name: str
    members: dict[str, Role] = field(default_factory=dict)
    quota: Quota = Quota()
    budget: Budget | None = None


@dataclass(frozen=True)
class Grant:
    """What an identity may do: its tenant and role there (None when it is
    no member), and whether it is an operator."""

    tenant: str | None
    role: Role | None
    operator: bool = False
