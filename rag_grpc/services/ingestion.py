"""rag.v1.IngestionService over the durable job queue."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from rag_grpc.ingest.backend import IngestionBackend
from rag_grpc.pb import ingestion_pb2, ingestion_service_pb2_grpc
from rag_grpc.services import convert


class IngestionServicer(ingestion_service_pb2_grpc.IngestionServiceServicer):
    """Submit, GetJob, WatchJob."""

    def __init__(self, manager: IngestionBackend) -> None:
        self.manager = manager

    async def Submit(
        self, request: ingestion_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> ingestion_pb2.SubmitResponse:
        documents = [convert.document_from_pb(d) for d in request.documents]
        job_id = await self.manager.submit(request.namespace, documents)
        return ingestion_pb2.SubmitResponse(job_id=job_id)

    async def GetJob(
        self, request: ingestion_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> ingestion_pb2.Job:
        return convert.job_to_pb(await self.manager.get(request.job_id))

    async def WatchJob(
        self, request: ingestion_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ingestion_pb2.Job]:
        async for status in self.manager.watch(request.job_id):
            yield convert.job_to_pb(status)
