"""Backends that call other rag-grpc services over gRPC, for Ask when
retrieval or generation runs in another process. They inherit the caller's
deadline, and a cancelled Ask cancels their calls."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from rag_grpc import errors
from rag_grpc.deadlines import remaining
from rag_grpc.documents import SearchResult
from rag_grpc.generate.base import GenerationEvent, GenerationParams, Passage
from rag_grpc.index.query import SearchQuery
from rag_grpc.pb import generation_pb2, generation_service_pb2_grpc, retrieval_service_pb2_grpc
from rag_grpc.security import tenancy
from rag_grpc.services import convert
from rag_grpc.services.interceptors import current_caller
from rag_grpc.services.status import ERROR_OF

# Statuses of a remote service passed on as the same core error. The rest
# (UNAVAILABLE, CANCELLED, and refusals of this server's own credential) are
# this deployment's trouble, not the caller's: they become Unavailable.
_PASSED_ON = {
    code: ERROR_OF[code]
    for code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
}
# Refusals passed on when the call carried the caller's own credential.
_CALLER_REFUSALS = {
    code: ERROR_OF[code]
    for code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
}


def _core_error(exc: grpc.aio.AioRpcError, service: str, target: str) -> errors.RagError:
    """A remote status as a core error; transport trouble becomes Unavailable."""
    cls = _PASSED_ON.get(exc.code(), errors.Unavailable)
    if cls is errors.Unavailable:
        return errors.Unavailable(
            f"{service} at {target} failed: {exc.code().name} {exc.details()}"
        )
    return cls(exc.details() or exc.code().name)


class _Remote:
    """One remote service: its stub, target, call timeout and metadata."""

    stub_class: Callable[[grpc.aio.Channel], Any]

    def __init__(
        self,
        channel: grpc.aio.Channel,
        target: str,
        timeout_s: float,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.stub = self.stub_class(channel)
        self.target = target
        self.timeout_s = timeout_s
        self.metadata = metadata


class RemoteSearch(_Remote):
    """SearchBackend over a remote RetrievalService."""

    stub_class = retrieval_service_pb2_grpc.RetrievalServiceStub

    async def search(self, query: SearchQuery) -> SearchResult:
        metadata = self.metadata
        tenant, own_name = tenancy.split(query.namespace)
        if tenant is not None:
            # A tenant's Ask searches the remote service as the same caller,
            # which scopes the name there again (it never takes a stored name).
            credentials = current_caller().credentials
            if not credentials:
                raise errors.FailedPrecondition(
                    f"retrieval runs at {self.target}, and a tenant's search there must carry "
                    "the caller's own credential: call Ask with a bearer token or API key "
                    "(a client certificate cannot be passed on)"
                )
            metadata = credentials
            query = dataclasses.replace(query, namespace=own_name)
        try:
            response = await self.stub.Search(
                convert.query_to_pb(query),
                timeout=remaining(self.timeout_s),
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as exc:
            # With the caller's own credential, a refusal is the caller's;
            # with this server's, it is a deployment fault (UNAVAILABLE).
            refusal = _CALLER_REFUSALS.get(exc.code()) if tenant is not None else None
            if refusal is not None:
                raise refusal(exc.details() or exc.code().name) from None
            raise _core_error(exc, "RetrievalService", self.target) from None
        return convert.result_from_pb(response)


class RemoteGenerator(_Remote):
    """Generator over a remote GenerationService (streamed)."""

    name = "remote"
    stub_class = generation_service_pb2_grpc.GenerationServiceStub

    async def generate(
        self, prompt: str, passages: Sequence[Passage], params: GenerationParams
    ) -> AsyncIterator[GenerationEvent]:
        request = generation_pb2.GenerateRequest(
            prompt=prompt,
            context=[convert.passage_to_pb(p) for p in passages],
            parameters=convert.params_to_pb(params),
        )
        call = self.stub.Generate(
            request, timeout=remaining(self.timeout_s), metadata=self.metadata
        )
        try:
            async for response in call:
                yield convert.generation_event_from_pb(response)
        except grpc.aio.AioRpcError as exc:
            raise _core_error(exc, "GenerationService", self.target) from None
        finally:
            call.cancel()
