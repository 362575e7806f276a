"""Access control of a running server in one object: who a call is, what it
may do and for which tenant, whether the tenant's quotas let it, what it
used, and the audit trail of privileged actions and refusals.

The interceptor asks `authenticate` and `authorize` once per call; the
servicers ask the quota and usage methods with the call's tenant; the write
path asks `admit_write` (installed as its admission) for every write. No
gRPC types here.

Without a policy the server has one tenant and no prefix: every
authenticated caller (every caller, when no credential is configured) may do
everything, and quotas and usage are not kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

from rag_grpc.errors import FailedPrecondition, PermissionDenied, Unauthenticated
from rag_grpc.index.sizes import NamespaceSizes, Sizes, group_of
from rag_grpc.security.audit import AuditEvent, AuditLog
from rag_grpc.security.authn import Authenticator
from rag_grpc.security.authz import OPEN_SCOPE, Scope, authorize, is_open
from rag_grpc.security.identity import Identity
from rag_grpc.security.model import Quota, Role, Tenant, UsageReport
from rag_grpc.security.policy import Policy, PolicyHolder
from rag_grpc.security.quotas import QuotaEnforcer
from rag_grpc.security.usage import UsageLedger, estimated_cost

log = logging.getLogger(__name__)

# The scope of every call on a server without a policy: no tenant prefix,
# every method allowed (as before tenancy existed).
SINGLE_TENANT = Scope(tenant=None, role=Role.ADMIN, operator=True)

_STORAGE_QUOTAS = ("documents", "vectors", "stored_bytes", "namespaces")


@dataclass(frozen=True)
class Caller:
    """An admitted call: who made it (None on an open server or an open
    method) and the scope it acts in. credentials: the call's own bearer
    metadata, passed on when its Ask searches a remote retrieval service as
    the same caller (never shown)."""

    identity: Identity | None
    scope: Scope
    credentials: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)

    @property
    def tenant(self) -> str | None:
        """The tenant whose namespaces the call reads or writes (None: no prefix)."""
        return self.scope.tenant


class AccessControl:
    """Authentication, authorization, quotas, usage and audit for one server."""

    def __init__(
        self,
        authenticator: Authenticator,
        *,
        policy: PolicyHolder | None = None,
        require_identity: bool = False,
        audit: AuditLog | None = None,
        usage: UsageLedger | None = None,
        sizes: NamespaceSizes | None = None,
        namespaces: Callable[[], Iterable[str]] = tuple,
        quotas: QuotaEnforcer | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.policy = policy
        self.require_identity = require_identity or policy is not None
        self.audit = audit
        self.usage = usage
        self.sizes = sizes
        # Stored namespace names (for a tenant's totals and namespace count).
        self._namespaces = namespaces
        self.quotas = quotas or QuotaEnforcer()

    def set_namespaces(self, namespaces: Callable[[], Iterable[str]]) -> None:
        """Where the stored namespace names come from (the store)."""
        self._namespaces = namespaces

    @property
    def multi_tenant(self) -> bool:
        """Whether a policy of tenants is in force."""
        return self.policy is not None

    # -- identity and authorization ------------------------------------------

    def authenticate(
        self,
        metadata: Mapping[str, str],
        peer: str,
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> Identity | None:
        """The caller's identity (see Authenticator.identify); None on a
        server that takes no credentials at all, which ignores any sent (a
        client's RAG_GRPC_TOKEN must not break a local open server)."""
        if not self.require_identity:
            return None
        return self.authenticator.identify(metadata, peer, auth_context)

    def authorize(self, identity: Identity | None, method: str, request: object) -> Caller:
        """The scope the call may act in; Unauthenticated, PermissionDenied, or
        QuotaExceeded when its tenant is over its request rate."""
        if is_open(method):
            return Caller(identity, OPEN_SCOPE)
        if identity is None and self.require_identity:
            raise Unauthenticated(
                f"{method.rsplit('/', 1)[-1]} needs a credential and the call carries none: "
                f"send `authorization: Bearer <credential>` with {self.authenticator.accepted()}"
            )
        if self.policy is None:
            return Caller(identity, SINGLE_TENANT)
        assert identity is not None
        policy = self.policy.current
        scope = authorize(policy.grant(identity), method, request)
        if scope.tenant is not None:
            self.quotas.check_rate(scope.tenant, self.quota(scope.tenant, policy))
        return Caller(identity, scope)

    def tenant(self, name: str) -> Tenant | None:
        """The tenant called name in the policy in force (None without one)."""
        return self.policy.current.tenant(name) if self.policy is not None else None

    def quota(self, tenant: str, policy: Policy | None = None) -> Quota:
        """The tenant's quota (unlimited when it is not in the policy)."""
        policy = policy or (self.policy.current if self.policy is not None else None)
        found = policy.tenant(tenant) if policy is not None else None
        return found.quota if found is not None else Quota()

    # -- quotas ----------------------------------------------------------------

    def admit_write(self, namespace: str, adding: Sizes, new_namespace: bool) -> None:
        """The write path's admission: refuse (QuotaExceeded) a write that
        would take the namespace's tenant past a storage quota."""
        tenant = group_of(namespace)
        if tenant is None or self.policy is None:
            return
        quota = self.quota(tenant)
        if all(getattr(quota, name) is None for name in _STORAGE_QUOTAS):
            return
        stored, count = self.stored(tenant)
        self.quotas.check_write(
            tenant,
            quota,
            {
                "documents": stored.documents,
                "vectors": stored.vectors,
                "stored_bytes": stored.stored_bytes,
                "namespaces": count,
            },
            adding_documents=adding.documents,
            adding_vectors=adding.vectors,
            adding_bytes=adding.stored_bytes,
            adding_namespaces=1 if new_namespace else 0,
        )

    def stored(self, tenant: str) -> tuple[Sizes, int]:
        """What the tenant stores now, and in how many namespaces."""
        if self.sizes is None:
            return Sizes(), 0
        return self.sizes.group_totals(tenant, self._namespaces())

    def check_generation(self, tenant: str | None, requested_tokens: int) -> None:
        """Before generating for tenant: its daily token quota and, when its
        budget refuses generation, its spend today (QuotaExceeded)."""
        if tenant is None or self.policy is None or self.usage is None:
            return
        policy = self.policy.current
        found = policy.tenant(tenant)
        if found is None:
            return
        if found.quota.generated_tokens_per_day is not None:
            self.quotas.check_generation(
                tenant,
                found.quota,
                self.usage.generated_tokens_today(tenant),
                requested_tokens,
            )
        if found.budget is not None and found.budget.refuse_generation:
            self.quotas.check_budget(
                tenant, found.budget, self.usage.cost_today(tenant, policy.prices)
            )

    def budget_reached(self) -> dict[str, bool]:
        """Per tenant with a budget: whether today's estimated spend reached it."""
        if self.policy is None or self.usage is None:
            return {}
        policy = self.policy.current
        reached = {}
        for name, tenant in policy.tenants.items():
            if tenant.budget is not None:
                cost = self.usage.cost_today(name, policy.prices)
                reached[name] = cost >= tenant.budget.usd_per_day
        return reached

    # -- usage -----------------------------------------------------------------

    def count(self, tenant: str | None, **counts: int) -> None:
        """Add to the tenant's usage (embedding_tokens, prompt_tokens,
        completion_tokens, searches, asks); nothing without a tenant."""
        if tenant is None or self.usage is None:
            return
        self.usage.add(tenant, **counts)

    def count_embedding(self, namespace: str, tokens: int) -> None:
        """The write path's embedding listener: tokens read for a namespace's documents."""
        self.count(group_of(namespace), embedding_tokens=tokens)

    def usage_report(self, tenant: str | None) -> list[UsageReport]:
        """Usage with estimated costs: one tenant, or every tenant of the
        policy and any the ledger has counted (None)."""
        if self.policy is None or self.usage is None:
            raise FailedPrecondition(
                "usage is kept per tenant, and this server has no tenants: configure a "
                "policy (auth.policy_file)"
            )
        policy = self.policy.current
        if tenant is not None and policy.tenant(tenant) is None:
            raise PermissionDenied(f"there is no tenant {tenant!r} in the policy")
        names = [tenant] if tenant is not None else sorted(policy.tenants)
        for name in names:
            stored, _ = self.stored(name)
            self.usage.set_gauges(
                name,
                documents=stored.documents,
                vectors=stored.vectors,
                stored_bytes=stored.stored_bytes,
            )
        totals = self.usage.totals(tenant)
        return [
            UsageReport(
                tenant=name,
                estimated_cost=estimated_cost(usage, policy.prices, days_stored=1.0),
                estimated_cost_today=self.usage.cost_today(name, policy.prices),
                **asdict(usage),
            )
            for name, usage in totals.items()
        ]

    # -- audit -----------------------------------------------------------------

    def record(self, event: AuditEvent) -> None:
        """Append to the audit log; a failure is logged, never raised (the
        action it describes has already happened or been refused)."""
        if self.audit is None:
            return
        try:
            self.audit.record(event)
        except Exception:
            log.exception("could not write the audit record of %s", event.action)

    def denial(self, identity: Identity, method: str, request: object, reason: str) -> AuditEvent:
        """The audit record of a refused call: who, what, on which namespace
        and ids it named (as the caller named them), and why."""
        grant = self.policy.current.grant(identity) if self.policy is not None else None
        namespace = getattr(request, "namespace", None)
        ids = getattr(request, "ids", ())
        return AuditEvent(
            principal=identity.principal,
            tenant=grant.tenant if grant is not None else identity.tenant,
            action=method.rsplit("/", 1)[-1],
            outcome="denied",
            namespace=namespace if isinstance(namespace, str) and namespace else None,
            ids=tuple(str(i) for i in ids) if not isinstance(ids, str) else (),
            detail=reason,
        )

    def reload(self) -> str | None:
        """Reload the policy (and the JWT keys); keep the old ones on error.
        Returns the error text, None on success; audited either way."""
        errors = []
        if self.policy is not None:
            error = self.policy.reload()
            if error:
                errors.append(error)
        jwt = self.authenticator.jwt
        if jwt is not None:
            jwt_error = jwt.reload()
            if jwt_error is not None:
                log.error("JWKS reload failed, the previous keys stay in force: %s", jwt_error)
                errors.append(str(jwt_error))
        text = "; ".join(errors) or None
        self.record(
            AuditEvent(
                principal="signal:SIGHUP",
                tenant=None,
                action="policy.reload",
                outcome="ok" if text is None else "error: kept the previous policy",
                detail=(text or "")[:500],
            )
        )
        return text
