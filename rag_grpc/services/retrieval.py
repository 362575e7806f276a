"""rag.v1.RetrievalService over the in-process Retriever."""

from __future__ import annotations

import dataclasses
from concurrent.futures import Executor

import grpc

from rag_grpc.deadlines import in_thread
from rag_grpc.index.retriever import Retriever
from rag_grpc.ingest.backend import WriteBackend
from rag_grpc.pb import retrieval_pb2, retrieval_service_pb2_grpc
from rag_grpc.security import tenancy
from rag_grpc.security.access import AccessControl
from rag_grpc.services import convert
from rag_grpc.services.auditing import actor, audit, outcome_of
from rag_grpc.services.interceptors import current_caller


class RetrievalServicer(retrieval_service_pb2_grpc.RetrievalServiceServicer):
    """Upsert, Delete, Get, Search, SearchBatch."""

    def __init__(
        self,
        retriever: Retriever,
        executor: Executor | None,
        writes: WriteBackend,
        access: AccessControl | None = None,
    ) -> None:
        self.retriever = retriever
        self.executor = executor
        # In process, or through the shared log so every replica applies them.
        self.writes = writes
        self.access = access

    async def Upsert(
        self, request: retrieval_pb2.UpsertRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.UpsertResponse:
        namespace = tenancy.stored_name(current_caller().tenant, request.namespace)
        documents = [convert.document_from_pb(d) for d in request.documents]
        result = await self.writes.upsert(namespace, documents)
        return convert.upsert_result_to_pb(result)

    async def Delete(
        self, request: retrieval_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.DeleteResponse:
        caller = current_caller()
        namespace = tenancy.stored_name(caller.tenant, request.namespace)
        flt = convert.filter_from_pb(request.filter) if request.HasField("filter") else None
        ids = list(request.ids)
        # Every delete is audited: by ids, by filter, or forget (erased for good).
        action = "Delete:forget" if request.forget else "Delete:filter" if flt else "Delete"
        shown = tenancy.shown_name(caller.tenant, namespace)
        try:
            result = await self.writes.delete(
                namespace, ids, filter=flt, forget=request.forget, actor=actor(caller, context)
            )
        except BaseException as exc:
            await audit(
                self.access, caller, context, action, outcome_of(exc), namespace=shown, ids=ids
            )
            raise
        await audit(
            self.access,
            caller,
            context,
            action,
            "ok",
            namespace=shown,
            ids=ids,
            detail=f"deleted {result.documents} documents"
            + (f"; not found {len(result.not_found_ids)}" if result.not_found_ids else ""),
        )
        return convert.delete_result_to_pb(result)

    async def Get(
        self, request: retrieval_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.GetResponse:
        namespace = tenancy.stored_name(current_caller().tenant, request.namespace)
        found, missing = await in_thread(
            self.executor, self.retriever.get, namespace, list(request.ids)
        )
        return retrieval_pb2.GetResponse(
            documents=[convert.document_to_pb(d) for d in found], missing_ids=missing
        )

    async def Search(
        self, request: retrieval_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.SearchResponse:
        tenant = current_caller().tenant
        query = convert.query_from_pb(request)
        query = dataclasses.replace(query, namespace=tenancy.stored_name(tenant, query.namespace))
        # On the worker pool even for cheap vector searches: running them on
        # the event loop saved CPU on a 5k index but not on 100k at ef=320
        # (measured, see the notes in bench/RESULTS.md), and it would stall
        # every other call on this loop for the length of a search.
        result = await in_thread(self.executor, self.retriever.search, query)
        if self.access is not None:
            self.access.count(tenant, searches=1, embedding_tokens=result.embedding_tokens)
        return convert.result_to_pb(result)

    async def SearchBatch(
        self, request: retrieval_pb2.SearchBatchRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.SearchBatchResponse:
        tenant = current_caller().tenant
        # Every item is scoped: a batch cannot name another tenant's namespace.
        queries = [
            dataclasses.replace(q, namespace=tenancy.stored_name(tenant, q.namespace))
            for q in map(convert.query_from_pb, request.queries)
        ]
        results = await in_thread(self.executor, self.retriever.search_batch, queries)
        if self.access is not None:
            self.access.count(
                tenant,
                searches=len(queries),
                embedding_tokens=sum(r.embedding_tokens for r in results),
            )
        return retrieval_pb2.SearchBatchResponse(results=[convert.result_to_pb(r) for r in results])
