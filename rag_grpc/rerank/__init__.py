"""Optional cross-encoder re-ranking: export or load the model, score
(query, passage) pairs. Off unless [rerank] names a model (docs/reranking.md)."""

from rag_grpc.rerank.loader import load_reranker
from rag_grpc.rerank.reranker import Reranker

__all__ = ["Reranker", "load_reranker"]
