"""rag.v1.RagService: Ask streams citations, answer deltas, then a summary."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from rag_grpc.generate.base import AskFinished
from rag_grpc.generate.pipeline import RagPipeline
from rag_grpc.pb import rag_pb2, rag_service_pb2_grpc
from rag_grpc.security import tenancy
from rag_grpc.security.access import AccessControl
from rag_grpc.services import convert
from rag_grpc.services.generation import check_generation_quota
from rag_grpc.services.interceptors import current_caller


class RagServicer(rag_service_pb2_grpc.RagServiceServicer):
    """Ask (server streaming)."""

    def __init__(
        self,
        pipeline: RagPipeline,
        access: AccessControl | None = None,
        default_max_tokens: int = 256,
    ) -> None:
        self.pipeline = pipeline
        self.access = access
        self.default_max_tokens = default_max_tokens

    async def Ask(
        self, request: rag_pb2.AskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rag_pb2.AskResponse]:
        tenant = current_caller().tenant
        params = convert.params_from_pb(request.parameters)
        namespace = tenancy.stored_name(tenant, request.namespace)
        access = self.access
        await check_generation_quota(access, tenant, params.max_tokens or self.default_max_tokens)
        events = self.pipeline.ask(
            request.question,
            namespace=namespace,
            filter=convert.filter_from_pb(request.filter) if request.HasField("filter") else None,
            k=request.k,
            params=params,
        )
        async for event in events:
            if isinstance(event, AskFinished) and access is not None:
                usage = event.finished.usage
                # A cached answer generated nothing this time.
                access.count(
                    tenant,
                    asks=1,
                    prompt_tokens=0 if event.cached else usage.prompt_tokens,
                    completion_tokens=0 if event.cached else usage.completion_tokens,
                )
            yield convert.ask_event_to_pb(event)
