"""Namespaces belong to tenants: tenant acme's namespace "docs" is stored as
"acme~docs", so two tenants can both use "default" and neither can name the
other's. Every servicer maps names in and out here and nowhere else.

Callers never give a '~' (`resolve_user_namespace` refuses it), so a stored
name always says whose it is, and the write log, the job queue and every
replica carry and enforce the same scoping. Without a tenant (single-tenant
mode, or an operator's all-tenant view) names are stored as given.
"""

from __future__ import annotations

from rag_grpc.documents import TENANT_SEPARATOR, resolve_user_namespace


def stored_name(tenant: str | None, namespace: str) -> str:
    """The stored name of a caller's namespace ("" is "default"); raises
    InvalidArgument for a name a caller may not give."""
    name = resolve_user_namespace(namespace)
    return f"{tenant}{TENANT_SEPARATOR}{name}" if tenant else name


def split(stored: str) -> tuple[str | None, str]:
    """The tenant owning a stored namespace (None: no tenant) and its own name."""
    tenant, separator, name = stored.partition(TENANT_SEPARATOR)
    return (tenant, name) if separator else (None, stored)


def owns(tenant: str | None, stored: str) -> bool:
    """Whether a caller acting for tenant may see the stored namespace: its
    own, or any when it acts for no tenant (single-tenant mode)."""
    return tenant is None or split(stored)[0] == tenant


def shown_name(tenant: str | None, stored: str) -> str:
    """A stored namespace as the caller of tenant names it."""
    if tenant is None:
        return stored
    owner, name = split(stored)
    return name if owner == tenant else stored


def scrub(tenant: str | None, message: str) -> str:
    """An error message for a caller of tenant, its namespaces named as it
    names them. (The core only ever sees this tenant's stored names during
    its calls, so no other tenant's can be in the message.)"""
    if tenant is None:
        return message
    return message.replace(f"{tenant}{TENANT_SEPARATOR}", "")
