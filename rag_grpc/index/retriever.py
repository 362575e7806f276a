"""The retrieval core: write documents (chunk, embed, store, index) and
search them. Synchronous and thread-safe; the services call it from worker
threads. SQLite is the truth; each namespace's HNSW index is derived from it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rag_grpc import deadlines, telemetry
from rag_grpc.config import IndexConfig, LimitsConfig
from rag_grpc.documents import (
    Document,
    Hit,
    SearchResult,
    SearchTimings,
    WriteResult,
    chunk_id,
    resolve_namespace,
    validate_document_id,
    validate_metadata_key,
)
from rag_grpc.embed.chunking import TokenChunker
from rag_grpc.embed.encoder import Embedder
from rag_grpc.errors import InvalidArgument, NotFound
from rag_grpc.filters import Filter, validate_filter
from rag_grpc.native import MISSING_LABEL, VectorIndex
from rag_grpc.store.sqlite import DocumentStore, NewChunk

log = logging.getLogger(__name__)


# Document text formats taken as they are (no conversion from other formats).
SUPPORTED_CONTENT_TYPES = frozenset({"", "text/plain", "text/markdown"})


@dataclass(frozen=True)
class SearchQuery:
    """One query: text or a ready vector, with k, filter and search breadth."""

    namespace: str = ""
    text: str | None = None
    vector: Sequence[float] | np.ndarray | None = None
    k: int = 0
    filter: Filter | None = None
    ef: int = 0


@dataclass(frozen=True)
class NamespaceStats:
    """Stored and indexed sizes of one namespace."""

    name: str
    documents: int
    chunks: int
    vectors: int
    generation: int


class Retriever:
    """Documents in, nearest chunks out."""

    def __init__(
        self,
        store: DocumentStore,
        embedder: Embedder,
        chunker: TokenChunker,
        index_dir: Path,
        index_config: IndexConfig,
        limits: LimitsConfig,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.chunker = chunker
        self.index_dir = index_dir
        self.index_config = index_config
        self.limits = limits
        self._indexes: dict[str, VectorIndex] = {}
        self._results: ResultCache | None = (
            ResultCache(index_config.result_cache_entries)
            if index_config.result_cache_entries
            else None
        )
        # One writer per namespace keeps store generation and index in step.
        self._write_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        index_dir.mkdir(parents=True, exist_ok=True)
        for namespace in store.namespaces():
            self._indexes[namespace] = self._open_index(namespace)

    # -- index lifecycle ---------------------------------------------------

    def _new_index(self, capacity: int) -> VectorIndex:
        cfg = self.index_config
        return VectorIndex(
            self.embedder.dimension,
            "ip",
            max_elements=max(capacity, cfg.initial_capacity),
            M=cfg.m,
            ef_construction=cfg.ef_construction,
            exact_threshold=cfg.exact_scan_threshold,
        )

    def _index_paths(self, namespace: str) -> tuple[Path, Path]:
        return self.index_dir / f"{namespace}.hnsw", self.index_dir / f"{namespace}.json"

    def _open_index(self, namespace: str) -> VectorIndex:
        """Load the saved index and bring it up to date from the store (rows
        newer than the last label it applied, minus deleted ones); rebuild it
        from the store when it is missing, damaged or does not match."""
        path, meta_path = self._index_paths(namespace)
        generation = self.store.generation(namespace)
        live = self.store.labels(namespace)
        if path.exists() and meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
                if "last_label" not in meta:
                    raise ValueError("saved without its last applied label")
                index = VectorIndex.load(path, self.index_config.exact_scan_threshold)
                if index.dim != self.embedder.dimension:
                    raise ValueError(f"dimension {index.dim}, model has {self.embedder.dimension}")
                added = self._catch_up(namespace, index, int(meta["last_label"]), live)
                log.info(
                    "loaded index %s saved at generation %s, %d newer vectors applied; "
                    "store at generation %d",
                    namespace,
                    meta.get("generation"),
                    added,
                    generation,
                )
                return index
            except (ValueError, OSError) as exc:
                log.warning("rebuilding index %s: %s", namespace, exc)
        started = time.perf_counter()
        index = self._new_index(len(live))
        for labels, vectors in self.store.iter_vectors(namespace):
            index.add(vectors, labels)
        log.info(
            "rebuilt index %s from the store: %d vectors in %.2f s",
            namespace,
            len(index),
            time.perf_counter() - started,
        )
        return index

    def _catch_up(self, namespace: str, index: VectorIndex, last: int, live: np.ndarray) -> int:
        """Apply the store's changes since the index was saved: labels are never
        reused, so rows above its last label are new and labels it has that the
        store lacks were deleted. Raises ValueError when the result is not the store."""
        have = index.labels()
        gone = np.setdiff1d(have, live, assume_unique=True)
        if len(gone):
            index.delete(gone)
        added = 0
        for labels, vectors in self.store.iter_vectors(namespace, after=last):
            index.add(vectors, labels)
            added += len(labels)
        if not np.array_equal(np.sort(index.labels()), np.sort(live)):
            raise ValueError("its labels differ from the store's chunks after catching up")
        return added

    def save_indexes(self) -> None:
        """Persist every namespace's index with the last label it applied."""
        for namespace in list(self._indexes):
            with self._write_lock(namespace):
                path, meta_path = self._index_paths(namespace)
                index = self._indexes[namespace]
                index.save(path)
                meta = self._index_meta(index, self.store.generation(namespace))
                meta_path.write_text(json.dumps(meta))

    def _index_meta(self, index: VectorIndex, generation: int) -> dict[str, int]:
        labels = index.labels()
        return {
            "generation": generation,
            # Rows above this label are newer than the saved index.
            "last_label": int(labels.max()) if len(labels) else 0,
            "dimension": self.embedder.dimension,
        }

    def snapshot(self, out_dir: Path) -> tuple[dict[str, Path], dict[str, int]]:
        """Copy the database and every index into out_dir at one point in time
        (all namespaces' write locks held; searches go on). Returns the files
        (archive name -> path) and each namespace's generation."""
        namespaces = sorted(set(self._indexes) | set(self.store.namespaces()))
        locks = [self._write_lock(ns) for ns in namespaces]
        for lock in locks:
            lock.acquire()
        try:
            self.store.backup_to(out_dir / "rag.sqlite3")
            generations = {ns: self.store.generation(ns) for ns in namespaces}
            index_dir = out_dir / "index"
            index_dir.mkdir()
            for namespace, index in self._indexes.items():
                path = index_dir / f"{namespace}.hnsw"
                index.save(path)
                (index_dir / f"{namespace}.json").write_text(
                    json.dumps(self._index_meta(index, generations[namespace]))
                )
        finally:
            for lock in locks:
                lock.release()
        files = {
            str(path.relative_to(out_dir)): path
            for path in sorted(out_dir.rglob("*"))
            if path.is_file()
        }
        return files, generations

    def sweep_expired(self, namespace: str, ttl_s: float) -> int:
        """Delete the namespace's documents not written for ttl_s; return how many."""
        if not self.store.has_namespace(namespace):
            return 0
        expired = self.store.expired_ids(namespace, time.time() - ttl_s)
        if not expired:
            return 0
        result = self.delete(namespace, expired)
        log.info("retention: deleted %d expired documents from %s", result.documents, namespace)
        return result.documents

    def _erase_from_index(self, namespace: str) -> None:
        """Rebuild the namespace's index from the store and save it over the
        old files, so deleted vectors (hnswlib only marks them) are gone."""
        live = self.store.labels(namespace)
        index = self._new_index(len(live))
        for labels, vectors in self.store.iter_vectors(namespace):
            index.add(vectors, labels)
        self._indexes[namespace] = index
        path, meta_path = self._index_paths(namespace)
        index.save(path)
        meta = {
            "generation": self.store.generation(namespace),
            "dimension": self.embedder.dimension,
        }
        meta_path.write_text(json.dumps(meta))

    def _write_lock(self, namespace: str) -> threading.Lock:
        with self._locks_guard:
            return self._write_locks.setdefault(namespace, threading.Lock())

    # -- writes ------------------------------------------------------------

    def validate_upsert(self, documents: Sequence[Document]) -> None:
        """An Upsert call as a whole: 1 to max_documents_per_upsert valid documents."""
        if not documents:
            raise InvalidArgument("upsert needs at least one document")
        if len(documents) > self.limits.max_documents_per_upsert:
            raise InvalidArgument(
                f"upsert has {len(documents)} documents; at most "
                f"{self.limits.max_documents_per_upsert} per call (use IngestionService for more)"
            )
        self.validate_documents(documents)

    def validate_documents(self, documents: Sequence[Document]) -> None:
        """Raise InvalidArgument for the first document that cannot be stored."""
        seen: set[str] = set()
        for doc in documents:
            validate_document_id(doc.id)
            if doc.id in seen:
                raise InvalidArgument(
                    f"document id {doc.id!r} appears more than once; ids must be unique per request"
                )
            seen.add(doc.id)
            self.validate_document(doc)

    def validate_document(self, doc: Document) -> None:
        """Content type, size, text and metadata checks for one document."""
        kind = doc.content_type.split(";", 1)[0].strip().lower()
        if kind not in SUPPORTED_CONTENT_TYPES:
            raise InvalidArgument(
                f"document {doc.id!r} has content type {doc.content_type!r}; send text as "
                "text/plain or text/markdown (convert other formats before ingesting)"
            )
        size = len(doc.text.encode("utf-8", errors="surrogatepass"))
        if size > self.limits.max_document_bytes:
            raise InvalidArgument(
                f"document {doc.id!r} is {size} bytes; the limit is "
                f"{self.limits.max_document_bytes} bytes (split it into several documents)"
            )
        if not doc.text.strip():
            raise InvalidArgument(f"document {doc.id!r} has no text")
        for key, value in doc.metadata.items():
            validate_metadata_key(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidArgument(
                    f"document {doc.id!r} metadata {key!r} is not a finite number"
                )

    def upsert(self, namespace: str, documents: Sequence[Document]) -> WriteResult:
        """Store documents, replacing any with the same id; all or nothing."""
        namespace = resolve_namespace(namespace)
        self.validate_upsert(documents)
        # Re-submitting what is already stored does no work (no embedding, no
        # write, no new generation): idempotent by document id and content.
        same = self.store.unchanged(namespace, documents)
        documents = [d for d in documents if d.id not in same]
        if not documents:
            return WriteResult(0, 0, self.store.generation(namespace), unchanged=len(same))
        chunks = self.prepare(documents)
        result = self.apply_upsert(namespace, documents, chunks)
        return replace(result, unchanged=result.unchanged + len(same))

    def prepare(self, documents: Sequence[Document]) -> list[NewChunk]:
        """Chunk and embed documents (the expensive half of a write)."""
        spans = [(doc.id, self.chunker.split(doc.text)) for doc in documents]
        texts = [span.text for _, doc_spans in spans for span in doc_spans]
        vectors = self.embedder.embed(texts).vectors
        chunks = []
        row = 0
        for doc_id, doc_spans in spans:
            for seq, span in enumerate(doc_spans):
                chunks.append(NewChunk(doc_id, seq, span.text, vectors[row]))
                row += 1
        return chunks

    def apply_upsert(
        self,
        namespace: str,
        documents: Sequence[Document],
        chunks: Sequence[NewChunk],
        position: tuple[str, int] | None = None,
    ) -> WriteResult:
        """Store prepared documents and their chunks (the cheap half of a write).

        position (log, sequence) is committed with the write; documents stored
        with the same content already are skipped, so a log entry applied
        twice changes nothing."""
        with self._write_lock(namespace):
            deadlines.check("storing the documents")
            same = self.store.unchanged(namespace, documents) if position else set()
            if same:
                documents = [d for d in documents if d.id not in same]
                chunks = [c for c in chunks if c.doc_id not in same]
            if not documents:
                if position is not None:
                    self.store.set_position(*position)
                return WriteResult(0, 0, self.store.generation(namespace), unchanged=len(same))
            outcome = self.store.replace_documents(namespace, documents, chunks, position=position)
            index = self._indexes.get(namespace)
            if index is None:
                index = self._indexes[namespace] = self._new_index(len(chunks))
            index.delete(outcome.removed_labels)
            if chunks:
                index.add(np.stack([c.vector for c in chunks]), outcome.added_labels)
        return WriteResult(len(documents), len(chunks), outcome.generation, unchanged=len(same))

    def delete(
        self,
        namespace: str,
        doc_ids: Sequence[str],
        *,
        filter: Filter | None = None,
        forget: bool = False,
        actor: str = "",
        position: tuple[str, int] | None = None,
    ) -> WriteResult:
        """Delete documents by id and/or metadata filter; unknown ids are
        reported, not errors. forget erases them for good (see DeleteRequest).
        position (log, sequence) is committed with the deletion."""
        if position is not None and not self.store.has_namespace(resolve_namespace(namespace)):
            self.store.set_position(*position)
            return WriteResult(0, 0, 0, tuple(doc_ids))
        namespace = self._existing_namespace(namespace)
        if not doc_ids and filter is None:
            raise InvalidArgument("give document ids or a filter to delete by")
        if doc_ids:
            self._check_ids(doc_ids)
        if filter is not None:
            validate_filter(filter)
        with self._write_lock(namespace):
            deadlines.check("deleting the documents")
            ids = list(doc_ids)
            if filter is not None:
                ids += [i for i in self.store.doc_ids_matching(namespace, filter) if i not in ids]
            deleted, labels, generation = self.store.delete_documents(
                namespace, ids, erase=forget, position=position
            )
            self._indexes[namespace].delete(labels)
            if forget:
                self._erase_from_index(namespace)
                if self._results is not None:
                    self._results.drop_namespace(namespace)
                self.store.record_audit(actor or "unknown", "forget", namespace, deleted)
        doc_ids = ids
        missing = tuple(i for i in dict.fromkeys(doc_ids) if i not in set(deleted))
        return WriteResult(len(deleted), len(labels), generation, missing)

    def get(self, namespace: str, doc_ids: Sequence[str]) -> tuple[list[Document], list[str]]:
        """Stored documents in request order, and the ids not found."""
        namespace = self._existing_namespace(namespace)
        self._check_ids(doc_ids)
        found = self.store.get_documents(namespace, doc_ids)
        ordered = list(dict.fromkeys(doc_ids))
        return [found[i] for i in ordered if i in found], [i for i in ordered if i not in found]

    def _check_ids(self, doc_ids: Sequence[str]) -> None:
        if not doc_ids:
            raise InvalidArgument("give at least one document id")
        if len(doc_ids) > self.limits.max_ids_per_request:
            raise InvalidArgument(
                f"{len(doc_ids)} ids given; at most {self.limits.max_ids_per_request} per request"
            )
        for doc_id in doc_ids:
            validate_document_id(doc_id)

    # -- search ------------------------------------------------------------

    def _existing_namespace(self, namespace: str) -> str:
        name = resolve_namespace(namespace)
        if name not in self._indexes:
            known = ", ".join(sorted(self._indexes)) or "none yet"
            raise NotFound(f"namespace {name!r} does not exist (known: {known})")
        return name

    def _validate_query(self, query: SearchQuery) -> tuple[str, int]:
        namespace = self._existing_namespace(query.namespace)
        k = query.k or self.limits.default_k
        if not 1 <= k <= self.limits.max_k:
            raise InvalidArgument(f"k must be between 1 and {self.limits.max_k}, got {query.k}")
        if query.vector is not None:
            if len(query.vector) != self.embedder.dimension:
                raise InvalidArgument(
                    f"query vector has {len(query.vector)} values; this index has dimension "
                    f"{self.embedder.dimension} (model {self.embedder.model_id})"
                )
            vector = np.asarray(query.vector, dtype=np.float32)
            if not np.isfinite(vector).all():
                raise InvalidArgument("query vector contains NaN or infinite values")
            if not vector.any():
                raise InvalidArgument("query vector is all zeros; it has no direction to search")
        elif query.text is None or not query.text.strip():
            raise InvalidArgument("query is empty: give query text or a query vector")
        elif len(query.text.encode("utf-8", errors="surrogatepass")) > self.limits.max_query_bytes:
            raise InvalidArgument(
                f"query text is over {self.limits.max_query_bytes} bytes; shorten it"
            )
        if query.filter is not None:
            validate_filter(query.filter)
        return namespace, k

    def search(self, query: SearchQuery) -> SearchResult:
        """The k chunks nearest to the query, best first."""
        return self.search_batch([query])[0]

    def search_batch(self, queries: Sequence[SearchQuery]) -> list[SearchResult]:
        """Answer many queries: one embedding batch for the text ones, then the index."""
        if not queries:
            raise InvalidArgument("a search batch needs at least one query")
        if len(queries) > self.limits.max_batch_queries:
            raise InvalidArgument(
                f"{len(queries)} queries in one batch; at most {self.limits.max_batch_queries}"
            )
        started = time.perf_counter()
        plans = [self._validate_query(q) for q in queries]
        if self._results is None:
            results = self._search(queries, plans, started)
            for result in results:
                _record_outcome(result.hits)
            return results
        # Results are cached under the namespace's generation, which every
        # write bumps: the next Search after a write, from any client, misses
        # the cache and sees the write (read-your-writes).
        keys = [self._result_key(q, ns, k) for q, (ns, k) in zip(queries, plans, strict=True)]
        found: list[SearchResult | None] = [self._results.get(key) for key in keys]
        missing = [i for i, result in enumerate(found) if result is None]
        if missing:
            busy = {ns for ns, _ in plans if self._write_lock(ns).locked()}
            computed = self._search(
                [queries[i] for i in missing], [plans[i] for i in missing], started
            )
            for i, result in zip(missing, computed, strict=True):
                found[i] = result
                namespace = plans[i][0]
                # Only results known to match their generation are kept: no
                # write was running, before or after.
                if (
                    namespace not in busy
                    and not self._write_lock(namespace).locked()
                    and self.store.generation(namespace) == keys[i][1]
                ):
                    self._results.put(keys[i], result)
        results = [r for r in found if r is not None]
        for result in results:
            _record_outcome(result.hits)
        return results

    def _result_key(self, query: SearchQuery, namespace: str, k: int) -> tuple[Any, ...]:
        what = (
            ("text", query.text)
            if query.vector is None
            else ("vector", np.asarray(query.vector, dtype=np.float32).tobytes())
        )
        ef = max(query.ef or self.index_config.ef_search, k)
        return (namespace, self.store.generation(namespace), what, query.filter, k, ef)

    def _search(
        self, queries: Sequence[SearchQuery], plans: list[tuple[str, int]], started: float
    ) -> list[SearchResult]:
        vectors = np.zeros((len(queries), self.embedder.dimension), dtype=np.float32)
        text_rows = [i for i, q in enumerate(queries) if q.vector is None]
        if text_rows:
            with telemetry.span("embed", texts=len(text_rows)):
                vectors[text_rows] = self.embedder.embed(
                    [queries[i].text or "" for i in text_rows]
                ).vectors
        for i, q in enumerate(queries):
            if q.vector is not None:
                vectors[i] = _unit(np.asarray(q.vector, dtype=np.float32))
        embed_ms = (time.perf_counter() - started) * 1000
        deadlines.check("searching the index")
        # Queries that share namespace, filter, k and ef go to the index as one
        # native call (a batch runs in parallel without the GIL).
        groups: dict[tuple[str, Filter | None, int, int], list[int]] = {}
        for i, (query, (namespace, k)) in enumerate(zip(queries, plans, strict=True)):
            ef = max(query.ef or self.index_config.ef_search, k)
            groups.setdefault((namespace, query.filter, k, ef), []).append(i)
        results: list[SearchResult | None] = [None] * len(queries)
        for (namespace, flt, k, ef), rows in groups.items():
            t0 = time.perf_counter()
            with telemetry.span("store.filter", namespace=namespace, filtered=flt is not None):
                generation = self.store.generation(namespace)
                allowed = self.store.labels_matching(namespace, flt) if flt is not None else None
            with telemetry.span("index.search", namespace=namespace, queries=len(rows), k=k):
                labels, distances = self._indexes[namespace].search(vectors[rows], k, ef, allowed)
            search_ms = (time.perf_counter() - t0) * 1000 / len(rows)
            for row, row_labels, row_distances in zip(rows, labels, distances, strict=True):
                # Inner-product distance is 1 - cosine similarity for unit vectors.
                with telemetry.span("store.read", namespace=namespace):
                    hits = self._hydrate(row_labels, 1.0 - row_distances)
                timings = SearchTimings(
                    embed_ms=embed_ms / len(queries),
                    search_ms=search_ms,
                    total_ms=(time.perf_counter() - started) * 1000,
                )
                results[row] = SearchResult(hits, generation, timings)
        return [r for r in results if r is not None]

    def _hydrate(self, labels: np.ndarray, scores: np.ndarray) -> list[Hit]:
        wanted = [int(x) for x in labels.tolist() if x != MISSING_LABEL]
        records = self.store.get_chunks(wanted)
        hits = []
        for label, score in zip(labels, scores, strict=True):
            record = records.get(int(label))
            if record is None:
                continue  # deleted after the index answered
            hits.append(
                Hit(
                    record.doc_id,
                    chunk_id(record.doc_id, record.seq),
                    float(score),
                    record.text,
                    record.metadata,
                )
            )
        return hits

    # -- stats -------------------------------------------------------------

    def index_sizes(self) -> dict[str, int]:
        """Live vectors per loaded namespace index (no store access)."""
        return {name: len(index) for name, index in list(self._indexes.items())}

    def stats(self) -> list[NamespaceStats]:
        """Sizes per namespace."""
        return [
            NamespaceStats(
                c.name,
                c.documents,
                c.chunks,
                len(self._indexes[c.name]) if c.name in self._indexes else 0,
                c.generation,
            )
            for c in self.store.counts()
        ]


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def _record_outcome(hits: list[Hit]) -> None:
    """Query success rate and score distribution for the metrics."""
    t = telemetry.current()
    if t is None:
        return
    top = hits[0].score if hits else None
    success = top is not None and top >= t.config.relevance_threshold
    telemetry.record("searches", 1, outcome="success" if success else "miss")
    if top is not None:
        telemetry.record("scores", top)


class ResultCache:
    """A thread-safe LRU of search results, bounded in entries."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._items: OrderedDict[tuple[Any, ...], SearchResult] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[Any, ...]) -> SearchResult | None:
        with self._lock:
            result = self._items.get(key)
            if result is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return result

    def drop_namespace(self, namespace: str) -> None:
        """Forget every cached result of a namespace (their hits hold text)."""
        with self._lock:
            for key in [k for k in self._items if k[0] == namespace]:
                del self._items[key]

    def put(self, key: tuple[Any, ...], result: SearchResult) -> None:
        with self._lock:
            self._items[key] = result
            self._items.move_to_end(key)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)
