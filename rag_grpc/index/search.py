"""The read side: queries in, nearest chunks out. A batch is checked and
planned (`query`), answered from the result cache (`result_cache`) or by the
arms (`arms`: dense and lexical), fused and re-ranked (`ranking`); this
module runs those steps in order and keeps the timings and metrics."""

from __future__ import annotations

import contextvars
import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from rag_grpc.config import (
    IndexConfig,
    LimitsConfig,
    RerankConfig,
    RetrievalConfig,
    TelemetryConfig,
)
from rag_grpc.documents import Hit, SearchResult, SearchTimings
from rag_grpc.embed.encoder import Embedder
from rag_grpc.errors import FailedPrecondition, InvalidArgument
from rag_grpc.index import ranking
from rag_grpc.index.arms import DenseArm, LexicalArm
from rag_grpc.index.namespaces import NamespaceIndexes
from rag_grpc.index.plan import QueryPlanner, Retrieval, filter_key, per_document
from rag_grpc.index.query import SearchQuery
from rag_grpc.index.ranking import Rescorer
from rag_grpc.index.result_cache import ResultCache
from rag_grpc.store.sqlite import DocumentStore
from rag_grpc.telemetry import OFF, Recorder

# Rescorer is imported from here by server.py; SearchQuery by tests.
__all__ = ["Rescorer", "ResultCache", "SearchQuery", "Searcher"]


class Searcher:
    """Answers SearchQuery batches; thread-safe. Spans and the searches'
    outcomes (success when a dense hit scores at least
    `relevance_threshold`) go to `telemetry`."""

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
        telemetry: Recorder = OFF,
        relevance_threshold: float = TelemetryConfig().relevance_threshold,
    ) -> None:
        self.store = store
        self.indexes = indexes
        self.embedder = embedder
        self.config = config
        self.limits = limits
        self.retrieval = retrieval or RetrievalConfig()
        self.reranker = reranker
        self.rerank = rerank or RerankConfig()
        self.telemetry = telemetry
        self.relevance_threshold = relevance_threshold
        if self.retrieval.rerank_by_default and reranker is None:
            raise FailedPrecondition(
                "retrieval.rerank_by_default needs a re-ranker: configure [rerank]"
            )
        self.planner = QueryPlanner(
            indexes, embedder, config, limits, self.retrieval, self.rerank, reranker is not None
        )
        self.dense = DenseArm(store, indexes, embedder, config, limits, telemetry)
        self.lexical = LexicalArm(store, indexes, telemetry)
        # The lexical arm of hybrid queries runs here while the dense arm
        # embeds and walks the index (SQLite and ONNX Runtime release the GIL).
        self._lexical_pool = ThreadPoolExecutor(4, thread_name_prefix="lexical")
        self.results: ResultCache | None = (
            ResultCache(config.result_cache_entries, config.result_cache_bytes)
            if config.result_cache_entries
            else None
        )

    @property
    def default_mode_for(self) -> Callable[[str], str] | None:
        """The default mode for a namespace (feature flags, set by server.py);
        None: retrieval.default_mode everywhere."""
        return self.planner.default_mode_for

    @default_mode_for.setter
    def default_mode_for(self, default_mode_for: Callable[[str], str] | None) -> None:
        self.planner.default_mode_for = default_mode_for

    def search_batch(self, queries: Sequence[SearchQuery]) -> list[SearchResult]:
        """Answer many queries: one embedding batch for the text ones, then the index."""
        if not queries:
            raise InvalidArgument("a search batch needs at least one query")
        if len(queries) > self.limits.max_batch_queries:
            raise InvalidArgument(
                f"{len(queries)} queries in one batch; at most {self.limits.max_batch_queries}"
            )
        started = time.perf_counter()
        plans = [self.planner.validate(q) for q in queries]
        how = [self.planner.plan(q, k) for q, (_, k) in zip(queries, plans, strict=True)]
        if self.results is None:
            results = self._search(queries, plans, how, started)
            for result, retrieval in zip(results, how, strict=True):
                self._record_outcome(result.hits, retrieval.mode)
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
            self._record_outcome(result.hits, retrieval.mode)
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
            filter_key(query.filter),
            k,
            ef,
            per_document(query),
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
                    self.lexical.search,
                    namespace,
                    retrieval.expression,
                    retrieval,
                    per_document(query),
                    query.filter,
                )
        dense_rows = [i for i, retrieval in enumerate(how) if retrieval.mode != "lexical"]
        dense, tokens, embed_ms, search_ms = self.dense.search(
            queries, plans, how, dense_rows, started
        )
        results = []
        for i, (query, (_, k), retrieval) in enumerate(zip(queries, plans, how, strict=True)):
            t0 = time.perf_counter()
            grouping = per_document(query)
            hits = dense.get(i, [])
            if retrieval.mode != "dense":
                # A hybrid query with no word to match has no lexical arm.
                found = lexical_hits[i].result() if i in lexical_hits else []
                if retrieval.mode == "lexical":
                    hits = found
                else:
                    hits = ranking.fuse(hits, found, retrieval, grouping)
            if retrieval.rerank_top_n:
                assert self.reranker is not None  # the planner refuses rerank without one
                hits = ranking.rerank(
                    self.reranker,
                    query.text or "",
                    hits,
                    retrieval.rerank_top_n,
                    grouping,
                    self.telemetry,
                )
            hits = ranking.group_by_document(hits, k, grouping)[0] if grouping else hits[:k]
            timings = SearchTimings(
                embed_ms=embed_ms / len(queries),
                search_ms=search_ms.get(i, 0.0) + (time.perf_counter() - t0) * 1000,
                total_ms=(time.perf_counter() - started) * 1000,
            )
            results.append(SearchResult(hits, generations[i], timings, int(tokens[i])))
        return results

    def _record_outcome(self, hits: list[Hit], mode: str) -> None:
        """Query success rate and score distribution for the metrics, per mode.

        Only a dense score is a similarity the relevance threshold can judge;
        a lexical or hybrid search succeeds when it found anything."""
        top = hits[0].score if hits else None
        if mode == "dense":
            success = top is not None and top >= self.relevance_threshold
        else:
            success = top is not None
        self.telemetry.record("searches", 1, outcome="success" if success else "miss", mode=mode)
        if top is not None:
            self.telemetry.record("scores", max(top, 0.0), mode=mode)
