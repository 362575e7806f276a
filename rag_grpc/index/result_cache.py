"""Search results kept for repeated queries, keyed under the namespace's
generation (which every write bumps), bounded in entries and in bytes."""

from __future__ import annotations

from typing import Any

from rag_grpc.documents import SearchResult
from rag_grpc.lru import BoundedLRU


def result_bytes(result: SearchResult) -> int:
    """About what a cached result holds in memory: its texts and metadata."""
    return 200 + sum(
        300 + len(h.text) + len(h.document_id) + len(h.chunk_id) + 64 * len(h.metadata)
        for h in result.hits
    )


class ResultCache(BoundedLRU[tuple[Any, ...], SearchResult]):
    """Search results by (namespace, generation, query, filter, k, ef,
    hits per document), bounded in entries and in bytes."""

    def __init__(self, entries: int, max_bytes: int = 64 * 1024 * 1024) -> None:
        super().__init__(entries, max_bytes, lambda _, result: result_bytes(result))

    def drop_namespace(self, namespace: str) -> None:
        """Forget every cached result of a namespace (their hits hold text)."""
        self.drop(lambda key: key[0] == namespace)
