"""How a search will be answered (Retrieval): the query (`query.SearchQuery`)
checked and its choices resolved over the server's defaults, before anything
is embedded or searched."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rag_grpc.errors import FailedPrecondition, InvalidArgument
from rag_grpc.filters import Filter, validate_filter
from rag_grpc.index import fusion
from rag_grpc.index.query import SearchQuery
from rag_grpc.store import lexical

if TYPE_CHECKING:
    from rag_grpc.config import IndexConfig, LimitsConfig, RerankConfig, RetrievalConfig
    from rag_grpc.embed.encoder import Embedder
    from rag_grpc.index.namespaces import NamespaceIndexes

# Hits per document a by-document search may ask for; each one multiplies
# the candidates fetched.
MAX_CHUNKS_PER_DOCUMENT = 16

MODES = ("dense", "lexical", "hybrid")


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


class QueryPlanner:
    """Checks queries and resolves each into a Retrieval; thread-safe."""

    def __init__(
        self,
        indexes: NamespaceIndexes,
        embedder: Embedder,
        config: IndexConfig,
        limits: LimitsConfig,
        retrieval: RetrievalConfig,
        rerank: RerankConfig,
        has_reranker: bool,
    ) -> None:
        self.indexes = indexes
        self.embedder = embedder
        self.config = config
        self.limits = limits
        self.retrieval = retrieval
        self.rerank = rerank
        self.has_reranker = has_reranker
        # The default mode for a namespace (feature flags, set by server.py
        # through Searcher.default_mode_for); None: retrieval.default_mode
        # everywhere.
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
        pool = want * max(per_document(query), 1)
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
        if not self.has_reranker:
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


def per_document(query: SearchQuery) -> int:
    """Hits per document of a by-document query; 0 for a plain one."""
    return (query.chunks_per_document or 1) if query.by_document else 0


def filter_key(flt: Filter | None) -> str | None:
    """A filter as a key that tells its values' kinds apart: as dataclasses
    Equals("n", True) == Equals("n", 1) (True == 1 in Python), yet a boolean
    never matches a number. (1 and 1.0 differ here too: a cache miss only.)"""
    return None if flt is None else repr(flt)
