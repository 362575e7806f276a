"""After the arms: one ranking of hits from the dense and lexical ones
(hybrid), the re-ranker's scores over the first candidates, and hits grouped
by document. The score arithmetic of fusion is in `fusion`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from rag_grpc import deadlines
from rag_grpc.documents import Hit
from rag_grpc.index import fusion
from rag_grpc.telemetry import Recorder

if TYPE_CHECKING:
    from rag_grpc.index.plan import Retrieval


class Rescorer(Protocol):
    """A re-ranking model (rag_grpc.rerank): one score per passage for a
    query, higher is more relevant."""

    model_id: str

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray: ...


def fuse(dense: list[Hit], found: list[Hit], how: Retrieval, per_document: int) -> list[Hit]:
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


def rerank(
    reranker: Rescorer,
    text: str,
    hits: list[Hit],
    top_n: int,
    per_document: int,
    telemetry: Recorder,
) -> list[Hit]:
    """The first top_n candidates (documents, when by document) re-scored
    by the cross-encoder, best first; its span recorded into `telemetry`."""
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
    with telemetry.span("rerank", candidates=len(pool), model=reranker.model_id):
        scores = reranker.score(text, [hit.text for hit in pool])
    rescored = [
        dataclasses.replace(hit, score=float(score))
        for hit, score in zip(pool, scores, strict=True)
    ]
    return sorted(rescored, key=lambda h: -h.score)


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


def _ranking(hits: Sequence[Hit], key: str) -> list[tuple[str, float]]:
    """(chunk or document id, score) in the hits' order, each id once (a
    document at its first, best, hit)."""
    ranking: dict[str, float] = {}
    for hit in hits:
        ranking.setdefault(getattr(hit, key), hit.score)
    return list(ranking.items())
