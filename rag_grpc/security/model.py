"""The values the policy is made of and the other security modules share:
roles, a tenant's quota and budget, prices, API key entries, the grant
an identity receives, the Policy itself (policy.py reads it from its file),
and a tenant's usage and its report (usage.py keeps the counts).

Light on purpose: the Python client returns `UsageReport`, so this module
imports nothing that reads files or loads native code."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime

from rag_grpc.security.identity import Identity

# The one definition of a tenant name (used with fullmatch: "acme\n" is not
# one). Tenant names become part of stored namespace names ("<tenant>~<ns>").
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


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
class TenantUsage:
    """A tenant's usage: counters summed over the days asked for, gauges as
    last set."""

    embedding_tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    searches: int = 0
    asks: int = 0
    documents: int = 0
    vectors: int = 0
    stored_bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class UsageReport(TenantUsage):
    """A tenant's usage since it was first counted (stored sizes as they are
    now) with its estimated cost in USD, in all and on the current UTC day:
    what AdminService.Usage reports and `RagClient.usage` returns."""

    tenant: str
    estimated_cost: float = 0.0
    estimated_cost_today: float = 0.0


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


@dataclass(frozen=True)
class Policy:
    """Who may do what: tenants by name, operator principals, API keys and prices."""

    tenants: dict[str, Tenant] = field(default_factory=dict)
    operators: frozenset[str] = frozenset()
    api_keys: tuple[ApiKeyEntry, ...] = ()
    prices: Prices = field(default_factory=Prices)
    # principal -> (tenant, role), built once so grant() is one dict lookup per call.
    _members: dict[str, tuple[str, Role]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        for tenant in self.tenants.values():
            for principal, role in tenant.members.items():
                if principal in self._members:
                    # load_policy reports this with the file's context; this guards
                    # policies built in code, where a silent pick would grant at random.
                    raise ValueError(
                        f"{principal!r} is a member of tenants "
                        f"{self._members[principal][0]!r} and {tenant.name!r}"
                    )
                self._members[principal] = (tenant.name, role)

    def grant(self, identity: Identity) -> Grant:
        """The identity's tenant and role, and whether it is an operator.

        Membership is looked up by principal. When the credential names a
        tenant (a JWT claim) it must be the member's tenant, otherwise the
        identity gets no role anywhere: a token cannot move its holder into
        another tenant. Identities not listed as members get no role; tenants
        are never created on the fly.
        """
        operator = identity.principal in self.operators
        membership = self._members.get(identity.principal)
        if membership is None:
            return Grant(tenant=None, role=None, operator=operator)
        tenant, role = membership
        if identity.tenant is not None and identity.tenant != tenant:
            return Grant(tenant=None, role=None, operator=operator)
        return Grant(tenant=tenant, role=role, operator=operator)

    def tenant(self, name: str) -> Tenant | None:
        """The tenant called name, or None."""
        return self.tenants.get(name)
