"""Authorization: one table of which role each RPC needs, and the one
decision that turns a caller's grant, the method and its request into the
scope the call may act on."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from rag_grpc.errors import PermissionDenied, Unauthenticated
from rag_grpc.pb import retrieval_pb2
from rag_grpc.security.model import Grant, Role

# Methods that need no identity: load balancers and tools probe them before
# (or without) holding a credential, and they expose no tenant data.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Scope:
    """What an allowed call acts on: tenant is the tenant whose namespaces it
    reads or writes, or None for all tenants (operators only, or an open
    health/reflection call, where operator is False and no data is touched);
    role and operator are the caller's."""

    tenant: str | None
    role: Role | None
    operator: bool


# The scope of health and reflection calls, which carry no tenant data.
OPEN_SCOPE = Scope(tenant=None, role=None, operator=False)


@dataclass(frozen=True)
class Stricter:
    """A higher role for the requests of a method that reach further, e.g.
    a Delete that erases by filter rather than by named ids."""

    role: Role
    applies: Callable[[object], bool]
    # Words that finish "may not call Delete …" and "admin … ": the docs and
    # error messages show them.
    condition: str


@dataclass(frozen=True)
class Rule:
    """Who may call one method: members with at least `role` in their own
    tenant (None: no tenant role is enough), operators for all tenants when
    `operators` is set, and a stricter role for some requests."""

    role: Role | None
    operators: bool = False
    stricter: Stricter | None = None

    def describe(self) -> str:
        """The rule in words, for docs: e.g. "writer or above; admin or above
        with a filter or forget=true"."""
        parts = []
        if self.role is not None:
            parts.append(f"{_name(self.role)} or above in their tenant")
        if self.stricter is not None:
            parts.append(f"{_name(self.stricter.role)} or above {self.stricter.condition}")
        if self.operators:
            parts.append("operators for all tenants" if parts else "operators only")
        return "; ".join(parts)


def _delete_reaches_further(request: object) -> bool:
    # A filter can match any number of documents, and forget rewrites the
    # database and index: both are beyond deleting ids one names. A request
    # of another type (or none, if the caller could not see it yet) takes the
    # stricter rule, so an unexpected shape never lowers the bar.
    if not isinstance(request, retrieval_pb2.DeleteRequest):
        return True
    return request.HasField("filter") or request.forget


_DELETE_BEYOND_IDS = Stricter(
    role=Role.ADMIN,
    applies=_delete_reaches_further,
    condition="with a filter or forget=true",
)

# Every rag.v1 method and who may call it. A method missing here is refused
# for everyone: a new RPC stays closed until someone decides its rule.
RULES: Mapping[str, Rule] = MappingProxyType(
    {
        "/rag.v1.RetrievalService/Search": Rule(Role.READER),
        "/rag.v1.RetrievalService/SearchBatch": Rule(Role.READER),
        "/rag.v1.RetrievalService/Get": Rule(Role.READER),
        "/rag.v1.RagService/Ask": Rule(Role.READER),
        "/rag.v1.EmbeddingService/Embed": Rule(Role.READER),
        "/rag.v1.GenerationService/Generate": Rule(Role.READER),
        # Readers follow the jobs of their own tenant; the scope's tenant is
        # what the job lookup must match.
        "/rag.v1.IngestionService/GetJob": Rule(Role.READER),
        "/rag.v1.IngestionService/WatchJob": Rule(Role.READER),
        "/rag.v1.RetrievalService/Upsert": Rule(Role.WRITER),
        "/rag.v1.IngestionService/Submit": Rule(Role.WRITER),
        "/rag.v1.RetrievalService/Delete": Rule(Role.WRITER, stricter=_DELETE_BEYOND_IDS),
        "/rag.v1.AdminService/Stats": Rule(Role.ADMIN, operators=True),
        "/rag.v1.AdminService/Usage": Rule(Role.ADMIN, operators=True),
        "/rag.v1.AdminService/Snapshot": Rule(None, operators=True),
        "/rag.v1.AdminService/AuditExport": Rule(None, operators=True),
    }
)


def is_open(method: str) -> bool:
    """Whether the method (health, reflection) needs no identity."""
    return method.startswith(OPEN_PREFIXES)


def authorize(grant: Grant | None, method: str, request: object) -> Scope:
    """The scope the call may act on, or PermissionDenied / Unauthenticated.

    method is the full gRPC name ("/rag.v1.RetrievalService/Search"); request
    is the request message, read only by request-dependent rules (Delete).
    """
    if is_open(method):
        return OPEN_SCOPE
    rule = RULES.get(method)
    short = method.rsplit("/", 1)[-1]
    if rule is None:
        raise PermissionDenied(
            f"{method} has no authorization rule, so nobody may call it until one is added"
        )
    if grant is None:
        raise Unauthenticated(f"{short} needs an identity; the call carries no credential")
    if grant.role is None and not grant.operator:
        # The credential checked out, so the caller is known: what it lacks is
        # a permission (gRPC's PERMISSION_DENIED), not authentication.
        raise PermissionDenied(
            f"the caller is not a member of any tenant, so it may not call {short}"
        )
    if rule.operators and grant.operator:
        # An operator that is also a member still gets the all-tenant view
        # here: Stats, Usage and Snapshot are its operator duties.
        return Scope(tenant=None, role=grant.role, operator=True)
    needed, condition = rule.role, ""
    if rule.stricter is not None and rule.stricter.applies(request):
        needed, condition = rule.stricter.role, f" {rule.stricter.condition}"
    if needed is None:
        raise PermissionDenied(f"{_who(grant)} may not call {short}; only operators can")
    if grant.role is None or grant.tenant is None:
        raise PermissionDenied(
            f"the caller is an operator but not a member of any tenant; {short} needs"
            f" the {_name(needed)} role in a tenant"
        )
    if grant.role < needed:
        raise PermissionDenied(
            f"{_who(grant)} may not call {short}{condition}; {_name(needed)} or above can"
        )
    return Scope(tenant=grant.tenant, role=grant.role, operator=grant.operator)


def _name(role: Role) -> str:
    return role.name.lower()


def _who(grant: Grant) -> str:
    if grant.role is not None and grant.tenant is not None:
        return f"role {_name(grant.role)} of tenant {grant.tenant}"
    return "an operator"
