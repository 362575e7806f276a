"""rag.v1.IngestionService over the durable job queue."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import grpc

from rag_grpc.errors import NotFound
from rag_grpc.ingest.backend import IngestionBackend
from rag_grpc.ingest.jobs import JobStatus
from rag_grpc.pb import ingestion_pb2, ingestion_service_pb2_grpc
from rag_grpc.security import tenancy
from rag_grpc.services import convert
from rag_grpc.services.interceptors import current_caller


class IngestionServicer(ingestion_service_pb2_grpc.IngestionServiceServicer):
    """Submit, GetJob, WatchJob."""

    def __init__(self, manager: IngestionBackend) -> None:
        self.manager = manager

    async def Submit(
        self, request: ingestion_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> ingestion_pb2.SubmitResponse:
        # The job carries the stored name, so whichever worker (or replica,
        # through the write log) runs it writes into this tenant's namespace.
        namespace = tenancy.stored_name(current_caller().tenant, request.namespace)
        documents = [convert.document_from_pb(d) for d in request.documents]
        job_id = await self.manager.submit(namespace, documents)
        return ingestion_pb2.SubmitResponse(job_id=job_id)

    async def GetJob(
        self, request: ingestion_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> ingestion_pb2.Job:
        tenant = current_caller().tenant
        return convert.job_to_pb(_shown(tenant, await self.manager.get(request.job_id)))

    async def WatchJob(
        self, request: ingestion_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ingestion_pb2.Job]:
        tenant = current_caller().tenant
        async for status in self.manager.watch(request.job_id):
            yield convert.job_to_pb(_shown(tenant, status))


def _shown(tenant: str | None, status: JobStatus) -> JobStatus:
    """The job as its tenant sees it; another tenant's job is NOT_FOUND, with
    the same message as a job that does not exist."""
    if not tenancy.owns(tenant, status.namespace):
        raise NotFound(f"job {status.job_id} does not exist")
    return dataclasses.replace(
        status,
        namespace=tenancy.shown_name(tenant, status.namespace),
        errors=tuple((doc_id, tenancy.scrub(tenant, message)) for doc_id, message in status.errors),
    )
