"""rag.v1.EmbeddingService over the ONNX encoder."""

from __future__ import annotations

from concurrent.futures import Executor

import grpc

from rag_grpc.config import LimitsConfig
from rag_grpc.deadlines import in_thread
from rag_grpc.embed.encoder import OnnxEncoder, validate_embed_request
from rag_grpc.pb import embedding_pb2, embedding_service_pb2_grpc


class EmbeddingServicer(embedding_service_pb2_grpc.EmbeddingServiceServicer):
    """Embed."""

    def __init__(self, encoder: OnnxEncoder, executor: Executor | None, limits: LimitsConfig):
        self.encoder = encoder
        self.executor = executor
        self.limits = limits

    async def Embed(
        self, request: embedding_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> embedding_pb2.EmbedResponse:
        texts = list(request.texts)
        validate_embed_request(
            texts,
            request.model_id,
            self.encoder,
            self.limits.max_embed_texts,
            self.limits.max_text_bytes,
        )
        output = await in_thread(self.executor, self.encoder.embed, texts)
        return embedding_pb2.EmbedResponse(
            model_id=self.encoder.model_id,
            dimension=self.encoder.dimension,
            count=len(texts),
            vectors=output.vectors.astype("<f4").tobytes(),
            token_count=output.token_count,
        )
