"""What the services need from the write side, whichever queue runs it.

Both backends (SQLite jobs in process, NATS JetStream shared) implement
`WriteBackend` for Upsert/Delete and `IngestionBackend` for jobs, so the
servicers never ask which one they talk to.

A deletion takes the same steps on every backend (resolve it to ids on the
writers' pool, then `apply_delete`), so `WriteBackend.delete` holds them
once; a backend supplies `apply_delete`, and may refuse writes
(`check_writable`) or run the blocking work its own way (`in_thread`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar

from rag_grpc import deadlines
from rag_grpc.documents import Document, WriteResult
from rag_grpc.filters import Filter
from rag_grpc.index.retriever import Retriever
from rag_grpc.index.writes import PreparedDelete
from rag_grpc.ingest.job_status import JobStatus

T = TypeVar("T")


class WriteBackend(ABC):
    """Upsert and Delete: prepared here, applied by every replica."""

    retriever: Retriever
    executor: Executor | None

    @abstractmethod
    async def upsert(self, namespace: str, documents: Sequence[Document]) -> WriteResult:
        """Store documents (all or nothing); returns once applied here."""

    async def delete(
        self,
        namespace: str,
        doc_ids: Sequence[str],
        *,
        filter: Filter | None = None,
        forget: bool = False,
        actor: str = "",
    ) -> WriteResult:
        """Delete documents by id and/or filter; returns once applied here. A
        filter is resolved to ids here, where the replicas' (converged)
        documents are the same."""
        self.check_writable()
        writes = self.retriever.writes
        prepared = await self.in_thread(
            lambda: writes.prepare_delete(
                namespace, doc_ids, filter=filter, forget=forget, actor=actor
            )
        )
        return await self.apply_delete(prepared)

    @abstractmethod
    async def apply_delete(self, prepared: PreparedDelete) -> WriteResult:
        """Apply a deletion prepared here or elsewhere (retention)."""

    def check_writable(self) -> None:
        """Raise when this backend refuses writes now (by default it never does)."""
        return

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking core work on the writers' pool, in the call's context
        (deadlines.check sees the caller's deadline)."""
        return await deadlines.in_thread(self.executor, fn, *args)


class IngestionBackend(Protocol):
    """IngestionService: durable jobs of many documents."""

    def start(self) -> None:
        """Start the background work on the running loop."""
        ...

    async def stop(self) -> None:
        """Stop it; unfinished work resumes at the next start (or elsewhere)."""
        ...

    async def submit(self, namespace: str, documents: Sequence[Document]) -> str:
        """Queue a job; its id once it is durable."""
        ...

    async def get(self, job_id: str) -> JobStatus:
        """A job's status; NotFound for an unknown id."""
        ...

    def watch(self, job_id: str) -> AsyncIterator[JobStatus]:
        """The job's status now and after every change, until it is done."""
        ...


class LocalWrites(WriteBackend):
    """WriteBackend over the in-process write path (no shared log)."""

    def __init__(self, retriever: Retriever, executor: Executor | None) -> None:
        self.retriever = retriever
        # The writers' own pool: a long write or forget never holds the
        # threads that searches run on.
        self.executor = executor

    async def upsert(self, namespace: str, documents: Sequence[Document]) -> WriteResult:
        return await self.in_thread(self.retriever.upsert, namespace, documents)

    async def apply_delete(self, prepared: PreparedDelete) -> WriteResult:
        return await self.in_thread(self.retriever.writes.apply_delete, prepared)
