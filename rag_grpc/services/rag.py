"""rag.v1.RagService: Ask streams citations, answer deltas, then a summary."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from rag_grpc.generate.base import Delta
from rag_grpc.generate.pipeline import AskFinished, Citations, RagPipeline
from rag_grpc.pb import rag_pb2, rag_service_pb2_grpc
from rag_grpc.services import convert


class RagServicer(rag_service_pb2_grpc.RagServiceServicer):
    """Ask (server streaming)."""

    def __init__(self, pipeline: RagPipeline) -> None:
        self.pipeline = pipeline

    async def Ask(
        self, request: rag_pb2.AskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rag_pb2.AskResponse]:
        events = self.pipeline.ask(
            request.question,
            namespace=request.namespace,
            filter=convert.filter_from_pb(request.filter) if request.HasField("filter") else None,
            k=request.k,
            params=convert.params_from_pb(request.parameters),
        )
        async for event in events:
            if isinstance(event, Citations):
                citations = []
                for index, hit in enumerate(event.hits, start=1):
                    citation = rag_pb2.Citation(
                        index=index,
                        document_id=hit.document_id,
                        chunk_id=hit.chunk_id,
                        score=hit.score,
                        text=hit.text,
                    )
                    convert.fill_metadata(citation.metadata, hit.metadata)
                    citations.append(citation)
                yield rag_pb2.AskResponse(citations=rag_pb2.Citations(citations=citations))
            elif isinstance(event, Delta):
                yield rag_pb2.AskResponse(delta=event.text)
            elif isinstance(event, AskFinished):
                t = event.timings
                yield rag_pb2.AskResponse(
                    summary=rag_pb2.AskSummary(
                        usage=convert.usage_to_pb(event.finished.usage),
                        timings=rag_pb2.AskTimings(
                            embed_ms=t.embed_ms,
                            retrieve_ms=t.retrieve_ms,
                            generate_ms=t.generate_ms,
                            first_token_ms=t.first_token_ms,
                            total_ms=t.total_ms,
                        ),
                        generator=event.finished.generator,
                        finish_reason=event.finished.finish_reason,
                        cited=list(event.cited),
                        cached=event.cached,
                    )
                )
