"""The two arms of a search, each giving hits best first: the dense arm
(embed the texts, walk each namespace's index, widen by-document searches
until they hold enough documents) and the lexical arm (BM25 over the store's
FTS5 table). Hits are read back from the store's chunk rows here."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from rag_grpc import deadlines
from rag_grpc.config import IndexConfig, LimitsConfig
from rag_grpc.documents import Hit, chunk_id
from rag_grpc.embed.encoder import Embedder
from rag_grpc.filters import Filter
from rag_grpc.index.namespaces import Index, NamespaceIndexes
from rag_grpc.index.plan import Retrieval, filter_key, per_document
from rag_grpc.index.query import SearchQuery
from rag_grpc.index.ranking import group_by_document
from rag_grpc.native import MISSING_LABEL
from rag_grpc.store.sqlite import DocumentStore
from rag_grpc.telemetry import OFF, Recorder


class DenseArm:
    """Embeds queries and searches the namespaces' vector indexes; thread-safe."""

    def __init__(
        self,
        store: DocumentStore,
        indexes: NamespaceIndexes,
        embedder: Embedder,
        config: IndexConfig,
        limits: LimitsConfig,
        telemetry: Recorder = OFF,
    ) -> None:
        self.store = store
        self.indexes = indexes
        self.embedder = embedder
        self.config = config
        self.limits = limits
        self.telemetry = telemetry

    def search(
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
            with self.telemetry.span("embed", texts=len(text_rows)):
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
            namespace, grouping = plans[i][0], per_document(queries[i])
            want, fetch = how[i].want, how[i].pool
            ef = max(queries[i].ef or self.config.ef_search, fetch)
            key = (namespace, filter_key(queries[i].filter), want, fetch, ef, grouping)
            groups.setdefault(key, []).append(i)
        for (namespace, _, want, fetch, ef, grouping), group in groups.items():
            flt = queries[group[0]].filter
            t0 = time.perf_counter()
            # Filters are answered in memory by the namespace's payload index
            # (SQLite took tens of ms at 20k documents, growing with the
            # matches), or by Milvus itself.
            index, allowed = self.indexes.for_search(namespace, flt)
            with self.telemetry.span(
                "index.search", namespace=namespace, queries=len(group), k=fetch
            ):
                labels, distances = index.search(
                    vectors[group],
                    fetch,
                    ef,
                    allowed,
                    exact_threshold=self._exact_threshold(index, ef),
                )
            for row, row_labels, row_distances in zip(group, labels, distances, strict=True):
                # Inner-product distance is 1 - cosine similarity for unit vectors.
                with self.telemetry.span("store.read", namespace=namespace):
                    found = hydrate(self.store, row_labels, 1.0 - row_distances)
                if grouping:
                    found = self._by_document(
                        index,
                        vectors[row],
                        found,
                        fetch,
                        int((row_labels != MISSING_LABEL).sum()),
                        want,
                        ef,
                        grouping,
                        allowed,
                    )
                hits[row] = found
            elapsed = (time.perf_counter() - t0) * 1000 / len(group)
            search_ms.update((row, elapsed) for row in group)
        return hits, tokens, embed_ms, search_ms

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
            hits = hydrate(self.store, labels[0], 1.0 - distances[0])
            grouped, documents = group_by_document(hits, len(hits), per_document)
        return grouped

    def _exact_threshold(self, index: Index, ef: int) -> int:
        """Allowed vectors up to which a filtered search scans them exactly.

        The filtered walk costs about ef / selectivity, the scan the allowed
        count; measured switch-overs (5k allowed at 20k live vectors and ef 64,
        12-15k at 100k and ef 100, bench/RESULTS.md) fit sqrt(19 ef live),
        capped by index.exact_scan_threshold."""
        return min(self.config.exact_scan_threshold, int(math.sqrt(19 * ef * max(len(index), 1))))


class LexicalArm:
    """BM25 over the store's full-text table, filters from the payload index."""

    def __init__(
        self, store: DocumentStore, indexes: NamespaceIndexes, telemetry: Recorder = OFF
    ) -> None:
        self.store = store
        self.indexes = indexes
        self.telemetry = telemetry

    def search(
        self,
        namespace: str,
        expression: str,
        how: Retrieval,
        per_document: int,
        flt: Filter | None,
    ) -> list[Hit]:
        """The best `how.pool` chunks by BM25; by document, every document
        among them (reading on while fewer than `how.want`), each with its
        best per_document chunks."""
        allowed = None
        if flt is not None:
            allowed = np.sort(self.indexes.payload(namespace).matching(flt))
        with self.telemetry.span("lexical.search", namespace=namespace):
            ranking = self.store.lexical_ranking(namespace, expression, allowed)
            hits: list[Hit] = []
            documents: set[str] = set()
            step = how.pool
            while True:
                part = [pair for _, pair in zip(range(step), ranking, strict=False)]
                labels = np.asarray([label for label, _ in part], dtype=np.uint64)
                found = hydrate(self.store, labels, np.asarray([score for _, score in part]))
                hits.extend(found)
                documents.update(hit.document_id for hit in found)
                if not per_document or len(part) < step or len(documents) >= how.want:
                    break
                deadlines.check("matching words")
        if per_document:
            return group_by_document(hits, len(documents), per_document)[0]
        return hits


def hydrate(store: DocumentStore, labels: np.ndarray, scores: np.ndarray) -> list[Hit]:
    """Hits for the labels an index or ranking gave, with their scores, in
    order; labels whose chunk was deleted meanwhile are skipped."""
    wanted = [int(x) for x in labels.tolist() if x != MISSING_LABEL]
    records = store.get_chunks(wanted)
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


def _unit(vector: np.ndarray) -> np.ndarray:
    # sqrt of a dot product: a third of np.linalg.norm's call overhead on a
    # 384-d vector, which shows on a 0.2 ms search.
    norm = math.sqrt(float(vector @ vector))
    return vector / norm if norm > 0 else vector
