"""The values the retrieval core takes and gives at its edge: a query and a
namespace's sizes. Kept apart from the searcher so that the client and the
message conversions can use them without loading the index machinery
(ONNX Runtime, the native extension, SQLite)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rag_grpc.filters import Filter


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
class NamespaceStats:
    """Stored and indexed sizes of one namespace."""

    name: str
    documents: int
    chunks: int
    vectors: int
    generation: int
