"""rag.v1.RetrievalService over the in-process Retriever."""

from __future__ import annotations

from concurrent.futures import Executor

import grpc

from rag_grpc.deadlines import in_thread
from rag_grpc.index.retriever import Retriever
from rag_grpc.ingest.backend import WriteBackend
from rag_grpc.pb import retrieval_pb2, retrieval_service_pb2_grpc
from rag_grpc.services import convert
from rag_grpc.services.interceptors import CLIENT


def actor(context: grpc.aio.ServicerContext) -> str:
    """Who asked, for the audit log: the gateway's client identity, else the peer."""
    return CLIENT.get() or f"peer {context.peer() or 'unknown'}"


class RetrievalServicer(retrieval_service_pb2_grpc.RetrievalServiceServicer):
    """Upsert, Delete, Get, Search, SearchBatch."""

    def __init__(
        self, retriever: Retriever, executor: Executor | None, writes: WriteBackend
    ) -> None:
        self.retriever = retriever
        self.executor = executor
        # In process, or through the shared log so every replica applies them.
        self.writes = writes

    async def Upsert(
        self, request: retrieval_pb2.UpsertRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.UpsertResponse:
        documents = [convert.document_from_pb(d) for d in request.documents]
        result = await self.writes.upsert(request.namespace, documents)
        return retrieval_pb2.UpsertResponse(
            upserted=result.documents,
            unchanged=result.unchanged,
            chunks=result.chunks,
            index_generation=result.index_generation,
        )

    async def Delete(
        self, request: retrieval_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.DeleteResponse:
        flt = convert.filter_from_pb(request.filter) if request.HasField("filter") else None
        result = await self.writes.delete(
            request.namespace,
            list(request.ids),
            filter=flt,
            forget=request.forget,
            actor=actor(context),
        )
        return retrieval_pb2.DeleteResponse(
            deleted=result.documents,
            not_found_ids=list(result.not_found_ids),
            index_generation=result.index_generation,
        )

    async def Get(
        self, request: retrieval_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.GetResponse:
        found, missing = await in_thread(
            self.executor, self.retriever.get, request.namespace, list(request.ids)
        )
        return retrieval_pb2.GetResponse(
            documents=[convert.document_to_pb(d) for d in found], missing_ids=missing
        )

    async def Search(
        self, request: retrieval_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.SearchResponse:
        query = convert.query_from_pb(request)
        # On the worker pool even for cheap vector searches: running them on
        # the event loop saved CPU on a 5k index but not on 100k at ef=320
        # (measured, see the notes in bench/RESULTS.md), and it would stall
        # every other call on this loop for the length of a search.
        result = await in_thread(self.executor, self.retriever.search, query)
        return convert.result_to_pb(result)

    async def SearchBatch(
        self, request: retrieval_pb2.SearchBatchRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.SearchBatchResponse:
        queries = [convert.query_from_pb(q) for q in request.queries]
        results = await in_thread(self.executor, self.retriever.search_batch, queries)
        return retrieval_pb2.SearchBatchResponse(results=[convert.result_to_pb(r) for r in results])
