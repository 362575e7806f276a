"""The read side: queries in, nearest chunks out, through the result cache,
the embedder, the payload index (filters), the native index and the store's
chunk rows."""

from __future__ import annotations

import contextvars
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from rag_grpc import deadlines, telemetry
from rag_grpc.config import IndexConfig, LimitsConfig, RerankConfig, RetrievalConfig
from rag_grpc.documents import Hit, SearchResult, SearchTimings, chunk_id
from rag_grpc.embed.encoder import Embedder
from rag_grpc.errors import FailedPrecondition, InvalidArgument
from rag_grpc.filters import Filter, validate_filter
from rag_grpc.index import fusion
from rag_grpc.index.namespaces import Index, NamespaceIndexes
from rag_grpc.lru import BoundedLRU
from rag_grpc.native import MISSING_LABEL
from rag_grpc.store import lexical
from rag_grpc.store.sqlite import DocumentStore

# Hits per document a by-document search may ask for; each one multiplies
# the candidates fetched.
MAX_CHUNKS_PER_DOCUMENT = 16

MODES = ("dense", "lexical", "hybrid")


class Rescorer(Protocol):
    """A re-ranking model (rag_grpc.rerank): one score per passage for a
    query, higher is more relevant."""

    model_id: str

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray: ...


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


@dataclass(frozen=True)
class Retrieval:
    """How one query is answered, the request's choices over the server's
    defaults: mode, fusion, and the candidates each stage takes."""

    mode: str
    method: str
    rrf_k: int
    weights: tuple[float, float]  # dense, lexical
    # Results each ranking must give (chunks, or documents when by
    # document): k, or the re-ranker's top_n.
    want: int
    # Chunks each ranking reads first (more when by document and they hold
    # fewer than `want` documents).
    pool: int
    # Candidates the re-ranker scores (0: no re-ranking).
    rerank_top_n: int
    # The lexical arm's FTS5 expression (None: no word to match).
    expression: str | None


class Searcher:
    """Answers SearchQuery batches; thread-safe."""

    def __init__(
        self,
        store: DocumentStore,
        indexes: NamespaceIndexes,
        embedder: Embedder,
        config: IndexConfig,
        limits: LimitsConfig,
        retrieval: RetrievalConfig | None = None,
        reranker: Rescorer | None = None,
        rerank: RerankConfig | None = None,
    ) -> None:
        self.store = store
        self.indexes = indexes
        self.embedder = embedder
        self.config = config
        self.limits = limits
        self.retrieval = retrieval or RetrievalConfig()
        self.reranker = reranker
        self.rerank = rerank or RerankConfig()
        if self.retrieval.rerank_by_default and reranker is None:
            raise FailedPrecondition(
                "retrieval.rerank_by_default needs a re-ranker: configure [rerank]"
            )
        # The lexical arm of hybrid queries runs here while the dense arm
        # embeds and walks the index (SQLite and ONNX Runtime release the GIL).
        self._lexical_pool = ThreadPoolExecutor(4, thread_name_prefix="lexical")
        self.results: ResultCache | None = (
            ResultCache(config.result_cache_entries, config.result_cache_bytes)
            if config.result_cache_entries
            else None
        )
        # The default mode for a namespace (feature flags, set by server.py);
        # None: retrieval.default_mode everywhere.
        self.default_mode_for: Callable[[str], str] | None = None

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

    def plan(self, query: SearchQuery, k: int) -> Retrieval:
        """The query's mode, fusion and candidates over the server's defaults;
        InvalidArgument / FailedPrecondition for choices it cannot have."""
        cfg = self.retrieval
        # A vector query left to the server's default is dense: the other
        # modes read words.
        default_mode: str = cfg.default_mode
        if not query.mode and self.default_mode_for is not None:
            default_mode = self.default_mode_for(query.namespace)
        mode = query.mode or (default_mode if query.vector is None else "dense")
        if mode not in MODES:
            raise InvalidArgument(f"unknown mode {query.mode!r}; choose {', '.join(MODES)}")
        method = query.fusion or cfg.fusion
        if method not in fusion.METHODS:
            raise InvalidArgument(
                f"unknown fusion {query.fusion!r}; choose {', '.join(fusion.METHODS)}"
            )
        tuned = (
            query.fusion
            or query.rrf_k
            or query.candidates
            or query.dense_weight is not None
            or query.lexical_weight is not None
        )
        if tuned and mode != "hybrid":
            raise InvalidArgument(f"fusion options apply to hybrid searches; this one is {mode}")
        if not 0 <= query.rrf_k <= 1000:
            raise InvalidArgument(f"rrf_k must be between 1 and 1000 (0: {cfg.rrf_k})")
        weights = (
            cfg.dense_weight if query.dense_weight is None else query.dense_weight,
            cfg.lexical_weight if query.lexical_weight is None else query.lexical_weight,
        )
        if not all(0.0 <= w <= 1.0 for w in weights) or not any(weights):
            raise InvalidArgument(
                f"weights must be between 0 and 1 and not both 0, got dense {weights[0]} "
                f"and lexical {weights[1]}"
            )
        if not 0 <= query.candidates <= self.limits.max_ef:
            raise InvalidArgument(
                f"candidates must be between 1 and {self.limits.max_ef} "
                f"(0: {cfg.hybrid_candidates}), got {query.candidates}"
            )
        expression = None
        if mode != "dense":
            if query.text is None:
                raise InvalidArgument(f"a {mode} search needs query text, not a vector")
            expression = lexical.match_expression(query.text)
            if expression is None and mode == "lexical":
                raise InvalidArgument(
                    "the query has no words to match lexically (only stop words or "
                    "punctuation); search it in dense or hybrid mode"
                )
        top_n = self._rerank_top_n(query, k)
        want = max(k, top_n)
        pool = want * max(_per_document(query), 1)
        if mode == "hybrid":
            # The server's default stays within its own cost bound, max_ef.
            default = min(cfg.hybrid_candidates, self.limits.max_ef)
            pool = max(pool, query.candidates or default)
        rrf_k = query.rrf_k or cfg.rrf_k
        return Retrieval(mode, method, rrf_k, weights, want, pool, top_n, expression)

    def _rerank_top_n(self, query: SearchQuery, k: int) -> int:
        rerank = self.retrieval.rerank_by_default if query.rerank is None else query.rerank
        if not rerank:
            if query.rerank_top_n:
                raise InvalidArgument("rerank_top_n applies to re-ranked searches; set rerank")
            return 0
        if self.reranker is None:
            raise FailedPrecondition(
                "this server has no re-ranker: configure [rerank] (see docs/reranking.md) "
                "or search without rerank"
            )
        if query.text is None:
            raise InvalidArgument("re-ranking needs query text, not a vector")
        top_n = query.rerank_top_n or max(self.rerank.top_n, k)
        if not k <= top_n <= self.rerank.max_top_n:
            raise InvalidArgument(
                f"rerank_top_n must be between k ({k}) and {self.rerank.max_top_n}, "
                f"got {query.rerank_top_n}"
            )
        return top_n

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
        how = [self.plan(q, k) for q, (_, k) in zip(queries, plans, strict=True)]
        if self.results is None:
            results = self._search(queries, plans, how, started)
            for result, retrieval in zip(results, how, strict=True):
                _record_outcome(result.hits, retrieval.mode)
            return results
        # Results are cached under the namespace's generation, which every
        # write bumps: the next Search after a write, from any client, misses
        # the cache and sees the write (read-your-writes).
        keys = [
            (*self._result_key(q, ns, k), retrieval)
            for q, (ns, k), retrieval in zip(queries, plans, how, strict=True)
        ]
        found: list[SearchResult | None] = [self.results.get(key) for key in keys]
        missing = [i for i, result in enumerate(found) if result is None]
        if missing:
            busy = {ns for ns, _ in plans if self.indexes.write_lock(ns).locked()}
            computed = self._search(
                [queries[i] for i in missing],
                [plans[i] for i in missing],
                [how[i] for i in missing],
                started,
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
        for result, retrieval in zip(results, how, strict=True):
            _record_outcome(result.hits, retrieval.mode)
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
            _exactly(query.filter),
            k,
            ef,
            _per_document(query),
        )

    def _search(
        self,
        queries: Sequence[SearchQuery],
        plans: list[tuple[str, int]],
        how: list[Retrieval],
        started: float,
    ) -> list[SearchResult]:
        generations = [self.indexes.generation(namespace) for namespace, _ in plans]
        # The lexical arm starts first, on its own threads, and runs while
        # the dense arm embeds and walks the index.
        lexical_hits: dict[int, Future[list[Hit]]] = {}
        for i, (query, (namespace, _), retrieval) in enumerate(
            zip(queries, plans, how, strict=True)
        ):
            if retrieval.expression is not None:
                lexical_hits[i] = self._lexical_pool.submit(
                    contextvars.copy_context().run,
                    self._lexical,
                    namespace,
                    retrieval.expression,
                    retrieval,
                    _per_document(query),
                    query.filter,
                )
        dense_rows = [i for i, retrieval in enumerate(how) if retrieval.mode != "lexical"]
        dense, tokens, embed_ms, search_ms = self._dense(queries, plans, how, dense_rows, started)
        results = []
        for i, (query, (_, k), retrieval) in enumerate(zip(queries, plans, how, strict=True)):
            t0 = time.perf_counter()
            per_document = _per_document(query)
            hits = dense.get(i, [])
            if retrieval.mode != "dense":
                # A hybrid query with no word to match has no lexical arm.
                found = lexical_hits[i].result() if i in lexical_hits else []
                if retrieval.mode == "lexical":
                    hits = found
                else:
                    hits = self._fuse(hits, found, retrieval, per_document)
            if retrieval.rerank_top_n:
                hits = self._rerank(query.text or "", hits, retrieval.rerank_top_n, per_document)
            hits = group_by_document(hits, k, per_document)[0] if per_document else hits[:k]
            timings = SearchTimings(
                embed_ms=embed_ms / len(queries),
                search_ms=search_ms.get(i, 0.0) + (time.perf_counter() - t0) * 1000,
                total_ms=(time.perf_counter() - started) * 1000,
            )
            results.append(SearchResult(hits, generations[i], timings, int(tokens[i])))
        return results

    def _dense(
        self,
        queries: Sequence[SearchQuery],
        plans: list[tuple[str, int]],
        how: list[Retrieval],
        rows: list[int],
        started: float,
    ) -> tuple[dict[int, list[Hit]], np.ndarray, float, dict[int, float]]:
        """The dense arm for the given rows: (hits by row, best first and
        grouped when by document; embedding tokens by query; embedding ms;
        index search ms by row)."""
        vectors = np.zeros((len(queries), self.embedder.dimension), dtype=np.float32)
        text_rows = [i for i in rows if queries[i].vector is None]
        tokens = np.zeros(len(queries), dtype=np.int64)
        if text_rows:
            with telemetry.span("embed", texts=len(text_rows)):
                embedded = self.embedder.embed([queries[i].text or "" for i in text_rows])
            vectors[text_rows] = embedded.vectors
            if len(embedded.token_counts) == len(text_rows):
                tokens[text_rows] = embedded.token_counts
        for i in rows:
            vector = queries[i].vector
            if vector is not None:
                vectors[i] = _unit(np.asarray(vector, dtype=np.float32))
        embed_ms = (time.perf_counter() - started) * 1000
        hits: dict[int, list[Hit]] = {}
        search_ms: dict[int, float] = {}
        if not rows:
            return hits, tokens, embed_ms, search_ms
        deadlines.check("searching the index")
        # Queries that share namespace, filter, candidates, ef and grouping go
        # to the index as one native call (a batch runs in parallel without
        # the GIL).
        groups: dict[tuple[str, str | None, int, int, int, int], list[int]] = {}
        for i in rows:
            namespace, per_document = plans[i][0], _per_document(queries[i])
            want, fetch = how[i].want, how[i].pool
            ef = max(queries[i].ef or self.config.ef_search, fetch)
            key = (namespace, _exactly(queries[i].filter), want, fetch, ef, per_document)
            groups.setdefault(key, []).append(i)
        for (namespace, _, want, fetch, ef, per_document), group in groups.items():
            flt = queries[group[0]].filter
            t0 = time.perf_counter()
            # Filters are answered in memory by the namespace's payload index
            # (SQLite took tens of ms at 20k documents, growing with the
            # matches), or by Milvus itself.
            index, allowed = self.indexes.for_search(namespace, flt)
            with telemetry.span("index.search", namespace=namespace, queries=len(group), k=fetch):
                labels, distances = index.search(
                    vectors[group],
                    fetch,
                    ef,
                    allowed,
                    exact_threshold=self._exact_threshold(index, ef),
                )
            for row, row_labels, row_distances in zip(group, labels, distances, strict=True):
                # Inner-product distance is 1 - cosine similarity for unit vectors.
                with telemetry.span("store.read", namespace=namespace):
                    found = self._hydrate(row_labels, 1.0 - row_distances)
                if per_document:
                    found = self._by_document(
                        index,
                        vectors[row],
                        found,
                        fetch,
                        int((row_labels != MISSING_LABEL).sum()),
                        want,
                        ef,
                        per_document,
                        allowed,
                    )
                hits[row] = found
            elapsed = (time.perf_counter() - t0) * 1000 / len(group)
            search_ms.update((row, elapsed) for row in group)
        return hits, tokens, embed_ms, search_ms

    def _lexical(
        self,
        namespace: str,
        expression: str,
        how: Retrieval,
        per_document: int,
        flt: Filter | None,
    ) -> list[Hit]:
        """The lexical arm: the best `how.pool` chunks by BM25; by document,
        every document among them (reading on while fewer than `how.want`),
        each with its best per_document chunks."""
        allowed = None
        if flt is not None:
            allowed = np.sort(self.indexes.payload(namespace).matching(flt))
        with telemetry.span("lexical.search", namespace=namespace):
            ranking = self.store.lexical_ranking(namespace, expression, allowed)
            hits: list[Hit] = []
            documents: set[str] = set()
            step = how.pool
            while True:
                part = [pair for _, pair in zip(range(step), ranking, strict=False)]
                labels = np.asarray([label for label, _ in part], dtype=np.uint64)
                found = self._hydrate(labels, np.asarray([score for _, score in part]))
                hits.extend(found)
                documents.update(hit.document_id for hit in found)
                if not per_document or len(part) < step or len(documents) >= how.want:
                    break
                deadlines.check("matching words")
        if per_document:
            return group_by_document(hits, len(documents), per_document)[0]
        return hits

    def _fuse(
        self, dense: list[Hit], found: list[Hit], how: Retrieval, per_document: int
    ) -> list[Hit]:
        """One ranking from the dense and the lexical one. By document, the
        documents are fused (each ranked by its best chunk in either arm),
        and a document's chunks are ordered by their fused score."""
        chunk_scores = dict(
            fusion.fuse(
                [_ranking(dense, "chunk_id"), _ranking(found, "chunk_id")],
                how.weights,
                how.method,
                how.rrf_k,
            )
        )
        by_chunk = {hit.chunk_id: hit for hit in (*found, *dense)}
        if not per_document:
            return [dataclasses.replace(by_chunk[c], score=s) for c, s in chunk_scores.items()]
        document_scores = fusion.fuse(
            [_ranking(dense, "document_id"), _ranking(found, "document_id")],
            how.weights,
            how.method,
            how.rrf_k,
        )
        chunks: dict[str, list[Hit]] = {}
        for hit in by_chunk.values():
            chunks.setdefault(hit.document_id, []).append(hit)
        fused = []
        for document, score in document_scores:
            ordered = sorted(chunks[document], key=lambda h: -chunk_scores[h.chunk_id])
            # The best chunk carries the document's score, so groups order by it.
            fused.append(dataclasses.replace(ordered[0], score=score))
            fused.extend(
                dataclasses.replace(hit, score=min(chunk_scores[hit.chunk_id], score))
                for hit in ordered[1:]
            )
        return fused

    def _rerank(self, text: str, hits: list[Hit], top_n: int, per_document: int) -> list[Hit]:
        """The first top_n candidates (documents, when by document) re-scored
        by the cross-encoder, best first."""
        assert self.reranker is not None  # plan() refuses rerank without one
        if per_document:
            pool: list[Hit] = []
            documents: set[str] = set()
            for hit in hits:
                if hit.document_id not in documents and len(documents) == top_n:
                    continue
                documents.add(hit.document_id)
                pool.append(hit)
        else:
            pool = hits[:top_n]
        if not pool:
            return []
        deadlines.check("re-ranking")
        with telemetry.span("rerank", candidates=len(pool), model=self.reranker.model_id):
            scores = self.reranker.score(text, [hit.text for hit in pool])
        rescored = [
            dataclasses.replace(hit, score=float(score))
            for hit, score in zip(pool, scores, strict=True)
        ]
        return sorted(rescored, key=lambda h: -h.score)

    def _by_document(
        self,
        index: Index,
        vector: np.ndarray,
        hits: list[Hit],
        fetch: int,
        fetched: int,
        k: int,
        ef: int,
        per_document: int,
        allowed: np.ndarray | None,
    ) -> list[Hit]:
        """Every document among the candidates with its best hits, grouped;
        fetching more candidates while fewer than k documents were found.

        A few long documents can fill any fixed number of candidates, so the
        fetch doubles instead, until k documents, an answer shorter than
        asked (the index or filter is exhausted), the namespace's size, or the
        larger of the first fetch and limits.max_ef (the widest search a
        client may ask for; its cost bound)."""
        bound = min(len(index), max(fetch, self.limits.max_ef))
        grouped, documents = group_by_document(hits, len(hits), per_document)
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
            grouped, documents = group_by_document(hits, len(hits), per_document)
        return grouped

    def _exact_threshold(self, index: Index, ef: int) -> int:
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


def _ranking(hits: Sequence[Hit], key: str) -> list[tuple[str, float]]:
    """(chunk or document id, score) in the hits' order, each id once (a
    document at its first, best, hit)."""
    ranking: dict[str, float] = {}
    for hit in hits:
        ranking.setdefault(getattr(hit, key), hit.score)
    return list(ranking.items())


def _exactly(flt: Filter | None) -> str | None:
    """A filter as a key that tells its values' kinds apart: as dataclasses
    Equals("n", True) == Equals("n", 1) (True == 1 in Python), yet a boolean
    never matches a number. (1 and 1.0 differ here too: a cache miss only.)"""
    return None if flt is None else repr(flt)


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


def _record_outcome(hits: list[Hit], mode: str) -> None:
    """Query success rate and score distribution for the metrics, per mode.

    Only a dense score is a similarity the relevance threshold can judge;
    a lexical or hybrid search succeeds when it found anything."""
    t = telemetry.current()
    if t is None:
        return
    top = hits[0].score if hits else None
    if mode == "dense":
        success = top is not None and top >= t.config.relevance_threshold
    else:
        success = top is not None
    telemetry.record("searches", 1, outcome="success" if success else "miss", mode=mode)
    if top is not None:
        telemetry.record("scores", max(top, 0.0), mode=mode)


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
