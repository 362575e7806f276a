"""rag.v1.GenerationService over a Generator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from rag_grpc import telemetry
from rag_grpc.config import LimitsConfig
from rag_grpc.generate.base import Delta, Generator, validate_context
from rag_grpc.pb import generation_pb2, generation_service_pb2_grpc
from rag_grpc.security.access import AccessControl
from rag_grpc.services import convert
from rag_grpc.services.interceptors import current_caller


async def check_generation_quota(
    access: AccessControl | None, tenant: str | None, max_tokens: int
) -> None:
    """A tenant's daily token quota and budget, before any work (QuotaExceeded):
    a read of the usage ledger, kept off the event loop."""
    if access is not None and tenant is not None:
        await asyncio.get_running_loop().run_in_executor(
            None, access.check_generation, tenant, max_tokens
        )


class GenerationServicer(generation_service_pb2_grpc.GenerationServiceServicer):
    """Generate (server streaming)."""

    def __init__(
        self,
        generator: Generator,
        limits: LimitsConfig,
        access: AccessControl | None = None,
        default_max_tokens: int = 256,
    ) -> None:
        self.generator = generator
        self.limits = limits
        self.access = access
        self.default_max_tokens = default_max_tokens

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        limits = self.limits
        passages = [convert.passage_from_pb(p) for p in request.context]
        validate_context(passages, limits.max_generate_passages, limits.max_generate_context_bytes)
        params = convert.params_from_pb(request.parameters)
        tenant = current_caller().tenant
        access = self.access
        await check_generation_quota(access, tenant, params.max_tokens or self.default_max_tokens)
        span = telemetry.start_current("generate", generator=self.generator.name)
        try:
            async for event in self.generator.generate(request.prompt, passages, params):
                if isinstance(event, Delta):
                    yield generation_pb2.GenerateResponse(delta=event.text)
                    continue
                span.end()
                telemetry.usage(
                    event.usage.prompt_tokens, event.usage.completion_tokens, event.generator
                )
                if access is not None:
                    access.count(
                        tenant,
                        prompt_tokens=event.usage.prompt_tokens,
                        completion_tokens=event.usage.completion_tokens,
                    )
                yield generation_pb2.GenerateResponse(
                    summary=convert.summary_to_pb(
                        event.generator, event.finish_reason, event.usage, event.cited_passages
                    )
                )
        finally:
            span.end()
