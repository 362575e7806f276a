"""What the services need from the write side, whichever queue runs it.

Both backends (SQLite jobs in process, NATS JetStream shared) implement
`WriteBackend` for Upsert/Delete and `IngestionBackend` for jobs, so the
servicers never ask which one they talk to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor
from typing import Protocol

from rag_grpc.deadlines import in_thread
from rag_grpc.documents import Document, WriteResult
from rag_grpc.filters import Filter
from rag_grpc.index.retriever import Retriever
from rag_grpc.index.writes import PreparedDelete
from rag_grpc.ingest.jobs import JobStatus


class WriteBackend(Protocol):
    """Upsert and Delete: prepared here, applied by every replica."""

    async def upsert(self, namespace: str, documents: Sequence[Document]) -> WriteResult:
        """Store documents (all or nothing); returns once applied here."""
        ...

    async def delete(
        self,
        namespace: str,
        doc_ids: Sequence[str],
        *,
        filter: Filter | None = None,
        forget: bool = False,
        actor: str = "",
    ) -> WriteResult:
        """Delete documents by id and/or filter; returns once applied here."""
        ...

    async def apply_delete(self, prepared: PreparedDelete) -> WriteResult:
        """Apply a deletion prepared elsewhere (retention)."""
        ...


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


class LocalWrites:
    """WriteBackend over the in-process write path (no shared log)."""

    def __init__(self, retriever: Retriever, executor: Executor | None) -> None:
        self.retriever = retriever
        # The writers' own pool: a long write or forget never holds the
        # threads that searches run on.
        self.executor = executor

    async def upsert(self, namespace: str, documents: Sequence[Document]) -> WriteResult:
        return await in_thread(self.executor, self.retriever.upsert, namespace, documents)

    async def delete(
        self,
        namespace: str,
        doc_ids: Sequence[str],
        *,
        filter: Filter | None = None,
        forget: bool = False,
        actor: str = "",
    ) -> WriteResult:
        writes = self.retriever.writes
        prepared = await in_thread(
            self.executor,
            lambda: writes.prepare_delete(
                namespace, doc_ids, filter=filter, forget=forget, actor=actor
            ),
        )
        return await self.apply_delete(prepared)

    async def apply_delete(self, prepared: PreparedDelete) -> WriteResult:
        return await in_thread(self.executor, self.retriever.writes.apply_delete, prepared)
