"""rag.v1.EmbeddingService over the batching, caching embedder."""

from __future__ import annotations

import asyncio

import grpc

from rag_grpc.config import LimitsConfig
from rag_grpc.embed.batcher import BatchingEmbedder
from rag_grpc.embed.encoder import validate_embed_request
from rag_grpc.pb import embedding_pb2, embedding_service_pb2_grpc
from rag_grpc.security.access import AccessControl
from rag_grpc.services.interceptors import current_caller


class EmbeddingServicer(embedding_service_pb2_grpc.EmbeddingServiceServicer):
    """Embed."""

    def __init__(
        self, embedder: BatchingEmbedder, limits: LimitsConfig, access: AccessControl | None = None
    ) -> None:
        self.embedder = embedder
        self.limits = limits
        self.access = access

    async def Embed(
        self, request: embedding_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> embedding_pb2.EmbedResponse:
        texts = list(request.texts)
        validate_embed_request(
            texts,
            request.model_id,
            self.embedder,
            self.limits.max_embed_texts,
            self.limits.max_text_bytes,
        )
        # Queued straight from the event loop: the batcher's thread runs the
        # model, and this call waits without holding a worker thread.
        output = await asyncio.wrap_future(self.embedder.submit(texts))
        if self.access is not None:
            self.access.count(current_caller().tenant, embedding_tokens=output.token_count)
        return embedding_pb2.EmbedResponse(
            model_id=self.embedder.model_id,
            dimension=self.embedder.dimension,
            count=len(texts),
            vectors=output.vectors.astype("<f4").tobytes(),
            token_count=output.token_count,
        )
