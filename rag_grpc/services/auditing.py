"""The audit trail of privileged actions as the servicers write it: who
(the caller's principal, or its address on a server without
authentication), for which tenant, what, on which namespace and ids, and
how it ended. Written off the event loop: each record is a durable commit."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from rag_grpc import errors
from rag_grpc.security.access import AccessControl, Caller
from rag_grpc.security.audit import AuditEvent
from rag_grpc.services.interceptors import status_of


def actor(caller: Caller, context: grpc.aio.ServicerContext) -> str:
    """Who asked: the authenticated principal, else the peer address."""
    if caller.identity is not None:
        return caller.identity.principal
    return f"peer {context.peer() or 'unknown'}"


def outcome_of(exc: BaseException) -> str:
    """An audit outcome for a call that failed with exc."""
    if isinstance(exc, errors.RagError):
        return f"error: {status_of(exc).name}"
    if isinstance(exc, asyncio.CancelledError):
        return "error: CANCELLED"
    return "error: INTERNAL"


async def audit(
    access: AccessControl | None,
    caller: Caller,
    context: grpc.aio.ServicerContext,
    action: str,
    outcome: str,
    *,
    namespace: str | None = None,
    ids: Sequence[str] = (),
    detail: str = "",
) -> None:
    """Record one action in the audit log (nothing if the server keeps none)."""
    if access is None or access.audit is None:
        return
    event = AuditEvent(
        principal=actor(caller, context),
        tenant=caller.tenant,
        action=action,
        outcome=outcome,
        namespace=namespace,
        ids=tuple(ids),
        detail=detail,
    )
    await asyncio.get_running_loop().run_in_executor(None, access.record, event)
