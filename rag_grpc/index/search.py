"""The read side: queries in, nearest chunks out, through the result cache,
the embedder, the payload index (filters), the native index and the store's
chunk rows."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rag_grpc import deadlines, telemetry
from rag_grpc.config import IndexConfig, LimitsConfig
from rag_grpc.documents import Hit, SearchResult, SearchTimings, chunk_id
from rag_grpc.embed.encoder import Embedder
from rag_grpc.errors import InvalidArgument
from rag_grpc.filters import Filter, validate_filter
from rag_grpc.index.namespaces import NamespaceIndexes
from rag_grpc.lru import BoundedLRU
from rag_grpc.native import MISSING_LABEL, VectorIndex
from rag_grpc.store.sqlite import DocumentStore

# Hits per document a by-document search may ask for; each one multiplies
# the candidates fetched.
MAX_CHUNKS_PER_DOCUMENT = 16


@dataclass(frozen=True)
class SearchQuery:
    """One query: text or a ready vector, with k, filter and search breadth.

    With by_document, k counts distinct documents, each with up to
    chunks_per_document (0: 1) of its best chunks."""

    namespace: str = ""
    text: str | None = None
    vector: Sequence[float] | np.ndarray | None = None
    k: int = 0
    filter: Filter | None = None
    ef: int = 0
    by_document: bool = False
    chunks_per_document: int = 0
    # "" (the server's default), "dense", "lexical" or "hybrid".
    mode: str = ""
    # Hybrid fusion: "" (server default), "rrf" or "relative_score"; 0 and
    # None mean the server's defaults.
    fusion: str = ""
    rrf_k: int = 0
    dense_weight: float | None = None
    lexical_weight: float | None = None
    candidates: int = 0
    # None: the server's default (retrieval.rerank_by_default).
    rerank: bool | None = None
    rerank_top_n: int = 0


class Searcher:
    """Answers SearchQuery batches; thread-safe."""

    def __init__(
        self,
        store: DocumentStore,
        indexes: NamespaceIndexes,
        embedder: Embedder,
        config: IndexConfig,
        limits: LimitsConfig,
    ) -> None:
        self.store = store
        self.indexes = indexes
        self.embedder = embedder
        self.config = config
        self.limits = limits
        self.results: ResultCache | None = (
            ResultCache(config.result_cache_entries, config.result_cache_bytes)
            if config.result_cache_entries
            else None
        )

    def validate(self, query: SearchQuery) -> tuple[str, int]:
        """(namespace, k) of a well-formed query; InvalidArgument / NotFound otherwise."""
        namespace = self.indexes.existing(query.namespace)
        k = query.k or self.limits.default_k
        if not 1 <= k <= self.limits.max_k:
            raise InvalidArgument(f"k must be between 1 and {self.limits.max_k}, got {query.k}")
        if not 0 <= query.ef <= self.limits.max_ef:
            raise InvalidArgument(
                f"ef must be between 1 and {self.limits.max_ef} (0: the default "
                f"{self.config.ef_search}), got {query.ef}"
            )
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
            validate_filter(query.filter, max_values=self.limits.max_filter_values)
        if query.chunks_per_document and not query.by_document:
            raise InvalidArgument(
                "chunks_per_document applies to by_document searches only; "
                "set by_document or leave chunks_per_document at 0"
            )
        if not 0 <= query.chunks_per_document <= MAX_CHUNKS_PER_DOCUMENT:
            raise InvalidArgument(
                f"chunks_per_document must be between 1 and {MAX_CHUNKS_PER_DOCUMENT} "
                f"(0: 1), got {query.chunks_per_document}"
            )
        return namespace, k

    def search_batch(self, queries: Sequence[SearchQuery]) -> list[SearchResult]:
        """Answer many queries: one embedding batch for the text ones, then the index."""
        if not queries:
            raise InvalidArgument("a search batch needs at least one query")
        if len(queries) > self.limits.max_batch_queries:
            raise InvalidArgument(
                f"{len(queries)} queries in one batch; at most {self.limits.max_batch_queries}"
            )
        started = time.perf_counter()
        plans = [self.validate(q) for q in queries]
        if self.results is None:
            results = self._search(queries, plans, started)
            for result in results:
                _record_outcome(result.hits)
            return results
        # Results are cached under the namespace's generation, which every
        # write bumps: the next Search after a write, from any client, misses
        # the cache and sees the write (read-your-writes).
        keys = [self._result_key(q, ns, k) for q, (ns, k) in zip(queries, plans, strict=True)]
        found: list[SearchResult | None] = [self.results.get(key) for key in keys]
        missing = [i for i, result in enumerate(found) if result is None]
        if missing:
            busy = {ns for ns, _ in plans if self.indexes.write_lock(ns).locked()}
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
                    and not self.indexes.write_lock(namespace).locked()
                    and self.indexes.generation(namespace) == keys[i][1]
                ):
                    self.results.put(keys[i], result)
        # A cached result read no text this time: nothing to bill.
        hit_rows = set(range(len(found))) - set(missing)
        results = [
            dataclasses.replace(r, embedding_tokens=0) if i in hit_rows else r
            for i, r in enumerate(found)
            if r is not None
        ]
        for result in results:
            _record_outcome(result.hits)
        return results

    def _result_key(self, query: SearchQuery, namespace: str, k: int) -> tuple[Any, ...]:
        what = (
            ("text", query.text)
            if query.vector is None
            else ("vector", np.asarray(query.vector, dtype=np.float32).tobytes())
        )
        ef = max(query.ef or self.config.ef_search, k)
        return (
            namespace,
            self.indexes.generation(namespace),
            what,
            query.filter,
            k,
            ef,
            _per_document(query),
        )

    def _search(
        self, queries: Sequence[SearchQuery], plans: list[tuple[str, int]], started: float
    ) -> list[SearchResult]:
        vectors = np.zeros((len(queries), self.embedder.dimension), dtype=np.float32)
        text_rows = [i for i, q in enumerate(queries) if q.vector is None]
        tokens = np.zeros(len(queries), dtype=np.int64)
        if text_rows:
            with telemetry.span("embed", texts=len(text_rows)):
                embedded = self.embedder.embed([queries[i].text or "" for i in text_rows])
            vectors[text_rows] = embedded.vectors
            if len(embedded.token_counts) == len(text_rows):
                tokens[text_rows] = embedded.token_counts
        for i, q in enumerate(queries):
            if q.vector is not None:
                vectors[i] = _unit(np.asarray(q.vector, dtype=np.float32))
        embed_ms = (time.perf_counter() - started) * 1000
        deadlines.check("searching the index")
        # Queries that share namespace, filter, k, ef and grouping go to the
        # index as one native call (a batch runs in parallel without the GIL).
        groups: dict[tuple[str, Filter | None, int, int, int], list[int]] = {}
        for i, (query, (namespace, k)) in enumerate(zip(queries, plans, strict=True)):
            per_document = _per_document(query)
            ef = max(query.ef or self.config.ef_search, k * max(per_document, 1))
            groups.setdefault((namespace, query.filter, k, ef, per_document), []).append(i)
        results: list[SearchResult | None] = [None] * len(queries)
        for (namespace, flt, k, ef, per_document), rows in groups.items():
            t0 = time.perf_counter()
            generation = self.indexes.generation(namespace)
            # Filters are answered in memory by the namespace's payload index
            # (SQLite took tens of ms at 20k documents, growing with the matches).
            allowed = self.indexes.payload(namespace).matching(flt) if flt is not None else None
            fetch = k * max(per_document, 1)
            with telemetry.span("index.search", namespace=namespace, queries=len(rows), k=k):
                index = self.indexes.get(namespace)
                labels, distances = index.search(
                    vectors[rows],
                    fetch,
                    ef,
                    allowed,
                    exact_threshold=self._exact_threshold(index, ef),
                )
            search_ms = (time.perf_counter() - t0) * 1000 / len(rows)
            for row, row_labels, row_distances in zip(rows, labels, distances, strict=True):
                # Inner-product distance is 1 - cosine similarity for unit vectors.
                with telemetry.span("store.read", namespace=namespace):
                    hits = self._hydrate(row_labels, 1.0 - row_distances)
                if per_document:
                    hits = self._by_document(
                        index,
                        vectors[row],
                        hits,
                        int((row_labels != MISSING_LABEL).sum()),
                        k,
                        ef,
                        per_document,
                        allowed,
                    )
                timings = SearchTimings(
                    embed_ms=embed_ms / len(queries),
                    search_ms=search_ms,
                    total_ms=(time.perf_counter() - started) * 1000,
                )
                results[row] = SearchResult(hits, generation, timings, int(tokens[row]))
        return [r for r in results if r is not None]

    def _by_document(
        self,
        index: VectorIndex,
        vector: np.ndarray,
        hits: list[Hit],
        fetched: int,
        k: int,
        ef: int,
        per_document: int,
        allowed: np.ndarray | None,
    ) -> list[Hit]:
        """k documents' best hits, fetching more candidates while fewer than k
        documents were found.

        A few long documents can fill any fixed number of candidates, so the
        fetch doubles instead, until k documents, an answer shorter than
        asked (the index or filter is exhausted), the namespace's size, or the
        larger of the first fetch and limits.max_ef (the widest search a
        client may ask for; its cost bound)."""
        fetch = k * per_document
        bound = min(len(index), max(fetch, self.limits.max_ef))
        grouped, documents = group_by_document(hits, k, per_document)
        while documents < k and fetched >= fetch and fetch < bound:
            fetch = min(fetch * 2, bound)
            deadlines.check("searching the index for more documents")
            wide_ef = max(ef, fetch)
            labels, distances = index.search(
                vector[None, :],
                fetch,
                wide_ef,
                allowed,
                exact_threshold=self._exact_threshold(index, wide_ef),
            )
            fetched = int((labels[0] != MISSING_LABEL).sum())
            hits = self._hydrate(labels[0], 1.0 - distances[0])
            grouped, documents = group_by_document(hits, k, per_document)
        return grouped

    def _exact_threshold(self, index: VectorIndex, ef: int) -> int:
        """Allowed vectors up to which a filtered search scans them exactly.

        The filtered walk costs about ef / selectivity, the scan the allowed
        count; measured switch-overs (5k allowed at 20k live vectors and ef 64,
        12-15k at 100k and ef 100, bench/RESULTS.md) fit sqrt(19 ef live),
        capped by index.exact_scan_threshold."""
        return min(self.config.exact_scan_threshold, int(math.sqrt(19 * ef * max(len(index), 1))))

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


def _per_document(query: SearchQuery) -> int:
    """Hits per document of a by-document query; 0 for a plain one."""
    return (query.chunks_per_document or 1) if query.by_document else 0


def group_by_document(hits: Sequence[Hit], k: int, per_document: int) -> tuple[list[Hit], int]:
    """The best per_document hits of each of the first k documents, grouped,
    groups ordered by their best hit; and how many documents that is."""
    groups: dict[str, list[Hit]] = {}
    for hit in sorted(hits, key=lambda h: -h.score):
        group = groups.get(hit.document_id)
        if group is None:
            if len(groups) < k:
                groups[hit.document_id] = [hit]
        elif len(group) < per_document:
            group.append(hit)
    return [hit for group in groups.values() for hit in group], len(groups)


def _unit(vector: np.ndarray) -> np.ndarray:
    # sqrt of a dot product: a third of np.linalg.norm's call overhead on a
    # 384-d vector, which shows on a 0.2 ms search.
    norm = math.sqrt(float(vector @ vector))
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
