"""The retrieval core as one object: documents in (the write path), nearest
chunks out (the searcher), over the store and each namespace's index.
Synchronous and thread-safe; the services call it from worker threads.

The parts live in their own modules: `namespaces` (index files, catch-up,
write locks), `payload` (each namespace's metadata values -> labels, for
filters), `writes` (prepare and apply), `search` (queries: planned, then
answered by the result cache or the arms, fused and re-ranked). This class
wires them together and is what servers, tests and benchmarks hold.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from rag_grpc.config import (
    IndexConfig,
    LimitsConfig,
    RerankConfig,
    RetrievalConfig,
    TelemetryConfig,
)
from rag_grpc.documents import Document, SearchResult, WriteResult
from rag_grpc.embed.chunking import TokenChunker
from rag_grpc.embed.encoder import Embedder
from rag_grpc.filters import Filter
from rag_grpc.index.namespaces import NamespaceIndexes
from rag_grpc.index.query import NamespaceStats, SearchQuery
from rag_grpc.index.ranking import Rescorer
from rag_grpc.index.result_cache import ResultCache
from rag_grpc.index.search import Searcher
from rag_grpc.index.writes import PreparedDelete, PreparedUpsert, WritePath
from rag_grpc.store.sqlite import DocumentStore
from rag_grpc.telemetry import OFF, Recorder

__all__ = ["NamespaceStats", "Retriever", "SearchQuery"]


class Retriever:
    """Documents in, nearest chunks out; metrics and spans go to `telemetry`
    (the server's, or OFF)."""

    def __init__(
        self,
        store: DocumentStore,
        embedder: Embedder,
        chunker: TokenChunker,
        index_dir: Path,
        index_config: IndexConfig,
        limits: LimitsConfig,
        *,
        retrieval: RetrievalConfig | None = None,
        reranker: Rescorer | None = None,
        rerank: RerankConfig | None = None,
        telemetry: Recorder = OFF,
        relevance_threshold: float = TelemetryConfig().relevance_threshold,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.limits = limits
        self.indexes = NamespaceIndexes(store, embedder.dimension, index_dir, index_config)
        self.writes = WritePath(
            store, self.indexes, embedder, chunker, index_config, limits, telemetry
        )
        self.searcher = Searcher(
            store,
            self.indexes,
            embedder,
            index_config,
            limits,
            retrieval,
            reranker,
            rerank,
            telemetry,
            relevance_threshold,
        )
        cache = self.searcher.results
        if cache is not None:
            self.writes.forget_listeners.append(cache.drop_namespace)

    @property
    def results(self) -> ResultCache | None:
        """The search result cache (None when turned off)."""
        return self.searcher.results

    # -- writes ------------------------------------------------------------

    def validate_document(self, doc: Document) -> None:
        """Raise InvalidArgument if the document cannot be stored."""
        self.writes.checks.validate_document(doc)

    def upsert(self, namespace: str, documents: Sequence[Document]) -> WriteResult:
        """Store documents, replacing any with the same id; all or nothing."""
        prepared = self.writes.prepare_upsert(namespace, documents)
        if not prepared.documents:
            return self.writes.unchanged_result(prepared)
        return self.writes.apply_upsert(prepared)

    def prepare_upsert(
        self, namespace: str, documents: Sequence[Document], *, per_document: bool = False
    ) -> PreparedUpsert:
        """The expensive half of a write (see `WritePath.prepare_upsert`)."""
        return self.writes.prepare_upsert(namespace, documents, per_document=per_document)

    def apply_upsert(
        self, prepared: PreparedUpsert, position: tuple[str, int] | None = None
    ) -> WriteResult:
        """The cheap half of a write (see `WritePath.apply_upsert`)."""
        return self.writes.apply_upsert(prepared, position)

    def delete(
        self,
        namespace: str,
        doc_ids: Sequence[str],
        *,
        filter: Filter | None = None,
        forget: bool = False,
        actor: str = "",
    ) -> WriteResult:
        """Delete documents by id and/or metadata filter; unknown ids are
        reported, not errors. forget erases them for good (see DeleteRequest)."""
        prepared = self.writes.prepare_delete(
            namespace, doc_ids, filter=filter, forget=forget, actor=actor
        )
        return self.writes.apply_delete(prepared)

    def expired(self, namespace: str, ttl_s: float) -> PreparedDelete | None:
        """The deletion retention asks for: documents not written for ttl_s
        (at most 10,000 a pass), or None when there are none."""
        if namespace not in self.indexes:
            return None
        cutoff = time.time() - ttl_s
        ids = self.store.expired_ids(namespace, cutoff)
        if not ids:
            return None
        return PreparedDelete(namespace, tuple(ids), actor="retention", older_than=cutoff)

    def compact(self, namespace: str | None = None) -> dict[str, tuple[int, int]]:
        """Reclaim deleted vectors and database space (see `WritePath.compact`)."""
        return self.writes.compact(namespace)

    def get(self, namespace: str, doc_ids: Sequence[str]) -> tuple[list[Document], list[str]]:
        """Stored documents in request order, and the ids not found."""
        namespace = self.indexes.existing(namespace)
        self.writes.checks.check_ids(doc_ids)
        found = self.store.get_documents(namespace, doc_ids)
        ordered = list(dict.fromkeys(doc_ids))
        return [found[i] for i in ordered if i in found], [i for i in ordered if i not in found]

    # -- search ------------------------------------------------------------

    def search(self, query: SearchQuery) -> SearchResult:
        """The k chunks nearest to the query, best first."""
        return self.searcher.search_batch([query])[0]

    def search_batch(self, queries: Sequence[SearchQuery]) -> list[SearchResult]:
        """Answer many queries: one embedding batch for the text ones, then the index."""
        return self.searcher.search_batch(queries)

    # -- files -------------------------------------------------------------

    def save_indexes(self, changed_only: bool = False) -> int:
        """Persist the namespaces' indexes (changed_only: those written since
        their last save) with the last label each applied; returns how many."""
        return self.indexes.save_all(changed_only)

    def snapshot(self, out_dir: Path) -> tuple[dict[str, Path], dict[str, int]]:
        """Copy the database and every index into out_dir at one point in time
        (all namespaces' write locks held for the copy only; searches go on).
        Returns the files (archive name -> path) and each namespace's generation."""
        with self.indexes.all_locked() as namespaces:
            self.store.backup_to(out_dir / "rag.sqlite3")
            generations = {ns: self.store.generation(ns) for ns in namespaces}
            index_dir = out_dir / "index"
            index_dir.mkdir(mode=0o700)
            for namespace in namespaces:
                self.indexes.save_copy(namespace, index_dir, generations[namespace])
        files = {
            str(path.relative_to(out_dir)): path
            for path in sorted(out_dir.rglob("*"))
            if path.is_file()
        }
        return files, generations

    # -- stats -------------------------------------------------------------

    def index_sizes(self) -> dict[str, int]:
        """Live vectors per loaded namespace index (no store access)."""
        return self.indexes.sizes()

    def stats(self) -> list[NamespaceStats]:
        """Sizes per namespace."""
        sizes = self.indexes.sizes()
        return [
            NamespaceStats(c.name, c.documents, c.chunks, sizes.get(c.name, 0), c.generation)
            for c in self.store.counts()
        ]
