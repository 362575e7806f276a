"""What each namespace stores (documents, vectors, bytes), for quotas and
usage: read from the store once per namespace, then kept current by every
write that the write path applies (in process, from a job or from the log).

Summing a namespace in SQL reads every document row (seconds at a million
documents), too slow to repeat per write; a write's own change costs a
lookup of the ids it touches.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from rag_grpc.documents import TENANT_SEPARATOR
from rag_grpc.store.sqlite import DocumentStore


@dataclass(frozen=True)
class Sizes:
    """Documents, vectors (one per chunk) and stored bytes (text and metadata)."""

    documents: int = 0
    vectors: int = 0
    stored_bytes: int = 0

    def __add__(self, other: Sizes) -> Sizes:
        return Sizes(
            self.documents + other.documents,
            self.vectors + other.vectors,
            self.stored_bytes + other.stored_bytes,
        )

    def __sub__(self, other: Sizes) -> Sizes:
        return Sizes(
            self.documents - other.documents,
            self.vectors - other.vectors,
            self.stored_bytes - other.stored_bytes,
        )


class NamespaceSizes:
    """Sizes per namespace; thread-safe.

    A namespace's figures are read from the store the first time they are
    needed. Writers call `ensure` under the namespace's write lock before
    their transaction and `change` after it; a reader that loads figures
    concurrently stores them only if none are there yet ("first wins"), so
    a load from before a write is corrected by that write's change and a
    load after it is dropped in favour of the writer's.
    """

    def __init__(self, store: DocumentStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._sizes: dict[str, Sizes] = {}

    def ensure(self, namespace: str) -> Sizes:
        """The namespace's sizes, loaded from the store if not known yet."""
        with self._lock:
            known = self._sizes.get(namespace)
        if known is not None:
            return known
        documents, vectors, stored = self.store.namespace_sizes(namespace)
        with self._lock:
            return self._sizes.setdefault(namespace, Sizes(documents, vectors, stored))

    def change(self, namespace: str, delta: Sizes) -> None:
        """Apply a committed write's change (after `ensure` under the same lock)."""
        with self._lock:
            current = self._sizes.get(namespace)
            if current is not None:
                self._sizes[namespace] = current + delta

    def group_totals(self, group: str | None, namespaces: Iterable[str]) -> tuple[Sizes, int]:
        """Sizes summed over the namespaces of a group (a tenant: the names
        "<group>~..."; None: those without a tenant), and how many there are."""
        members = [name for name in namespaces if group_of(name) == group]
        total = Sizes()
        for name in members:
            total = total + self.ensure(name)
        return total, len(members)


def group_of(namespace: str) -> str | None:
    """The tenant of a stored namespace name (None when it has none)."""
    tenant, separator, _ = namespace.partition(TENANT_SEPARATOR)
    return tenant if separator else None
