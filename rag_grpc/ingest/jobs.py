"""Durable ingestion jobs.

A submitted job and its documents are committed to SQLite before its id is
returned; one worker task takes queued jobs in order and upserts their
documents in batches. Progress is committed after each batch, and a job left
RUNNING by a crash resumes from its last committed position (upserts are
idempotent by document id, so a replayed batch does no harm).

A little over 400 lines: the jobs table (JobQueue) and the worker that drains
it (IngestionManager) are two classes of one idea, the SQLite job backend;
what every backend enforces on jobs lives in job_rules.py, and a job's status
type in job_status.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from rag_grpc import deadlines
from rag_grpc.config import LimitsConfig
from rag_grpc.documents import (
    Document,
    resolve_namespace,
)
from rag_grpc.errors import (
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from rag_grpc.index.retriever import Retriever
from rag_grpc.index.writes import PreparedUpsert
from rag_grpc.ingest.document_json import document_from_json, document_to_json
from rag_grpc.ingest.job_rules import WATCH_MAX_S, validate_job, validate_job_id, watch_job
from rag_grpc.ingest.job_status import JobState, JobStatus
from rag_grpc.store.database import connect, immediate_transaction, storage_error
from rag_grpc.telemetry import OFF, Recorder

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    state TEXT NOT NULL,
    total INTEGER NOT NULL,
    processed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    chunks INTEGER NOT NULL DEFAULT 0,
    errors TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS job_documents (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    document TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""

# Documents embedded and written together: enough texts for the encoder's
# length bucketing to keep padding low, and fewer commits (bench/ingest.py:
# overhead over raw embedding 10.8% with 32, 2.8% with 128).
BATCH_DOCUMENTS = 128


def transient(exc: BaseException) -> bool:
    """Whether retrying the same work later can succeed (a locked or full
    database, a dependency away), as opposed to a bad document."""
    if isinstance(exc, Unavailable | ResourceExhausted):
        return True
    if storage_error(exc) is not None or isinstance(exc, OSError):
        return True
    # An I/O error of the database file may pass too (a remount, a full disk
    # SQLite reports as I/O).
    text = str(exc).lower() if isinstance(exc, sqlite3.OperationalError) else ""
    return "disk i/o" in text or "unable to open" in text


class JobQueue:
    """Jobs table access (its own SQLite connection, serialised by a lock)."""

    def __init__(self, db_path: Path) -> None:
        # secure_delete like every connection: a finished job's documents
        # are zeroed when dropped, not left in free pages.
        self._conn = connect(db_path)
        self._conn.executescript(SCHEMA)
        self._lock = threading.Lock()
        with self._lock:
            # Jobs a crash left RUNNING go back to the queue and resume.
            self._conn.execute("UPDATE jobs SET state = 'QUEUED' WHERE state = 'RUNNING'")

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def submit(self, namespace: str, documents: Sequence[Document]) -> str:
        """Store the job and its documents in one transaction; return its id."""
        job_id = uuid.uuid4().hex
        now = time.time()
        rows = [
            (
                job_id,
                seq,
                json.dumps(document_to_json(d)),
            )
            for seq, d in enumerate(documents)
        ]
        with self._lock, immediate_transaction(self._conn):
            self._conn.execute(
                "INSERT INTO jobs (job_id, namespace, state, total, created_at, updated_at) "
                "VALUES (?, ?, 'QUEUED', ?, ?, ?)",
                (job_id, namespace, len(documents), now, now),
            )
            self._conn.executemany(
                "INSERT INTO job_documents (job_id, seq, document) VALUES (?, ?, ?)", rows
            )
        return job_id

    def pending_count(self) -> int:
        """Jobs not yet finished."""
        with self._lock:
            row = self._conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE state IN ('QUEUED', 'RUNNING')"
            ).fetchone()
        return int(row[0])

    def next_queued(self) -> JobStatus | None:
        """The oldest queued job, marked RUNNING."""
        with self._lock:
            row = self._conn.execute(
                "SELECT job_id FROM jobs WHERE state = 'QUEUED' ORDER BY created_at LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            self._conn.execute(
                "UPDATE jobs SET state = 'RUNNING', updated_at = ? WHERE job_id = ?",
                (time.time(), row[0]),
            )
        return self.get(row[0])

    def get(self, job_id: str) -> JobStatus:
        """A job's status; InvalidArgument for a malformed id, NotFound for an unknown one."""
        validate_job_id(job_id)
        with self._lock:
            row = self._conn.execute(
                "SELECT job_id, namespace, state, total, processed, failed, chunks, errors, "
                "created_at, updated_at FROM jobs WHERE job_id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            raise NotFound(f"job {job_id} does not exist")
        errors = tuple((e[0], e[1]) for e in json.loads(row[7]))
        return JobStatus(
            job_id=row[0],
            namespace=row[1],
            state=JobState(row[2]),
            total=row[3],
            processed=row[4],
            failed=row[5],
            chunks=row[6],
            errors=errors,
            created_at=row[8],
            updated_at=row[9],
        )

    def documents(self, job_id: str, start: int, count: int) -> list[Document]:
        """Documents of a job from position start."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT document FROM job_documents WHERE job_id = ? AND seq >= ? "
                "ORDER BY seq LIMIT ?",
                (job_id, start, count),
            ).fetchall()
        docs = [json.loads(r[0]) for r in rows]
        return [document_from_json(d) for d in docs]

    def record(self, status: JobStatus) -> None:
        """Commit a job's progress; a finished job's documents are dropped."""
        with self._lock, immediate_transaction(self._conn):
            self._conn.execute(
                "UPDATE jobs SET state = ?, processed = ?, failed = ?, chunks = ?, "
                "errors = ?, updated_at = ? WHERE job_id = ?",
                (
                    status.state.value,
                    status.processed,
                    status.failed,
                    status.chunks,
                    json.dumps(status.errors),
                    status.updated_at,
                    status.job_id,
                ),
            )
            if status.state.done:
                self._conn.execute("DELETE FROM job_documents WHERE job_id = ?", (status.job_id,))


class IngestionManager:
    """Accepts jobs and runs them on a supervised background task; watchers
    are woken by every change (pushed, not polled)."""

    def __init__(
        self,
        queue: JobQueue,
        retriever: Retriever,
        executor: Executor | None,
        limits: LimitsConfig,
        *,
        retry_s: float = 1.0,
        watch_max_s: float = WATCH_MAX_S,
        telemetry: Recorder = OFF,
    ) -> None:
        self.queue = queue
        self.retriever = retriever
        # Where the retries are counted (the server's Telemetry, or OFF).
        self.telemetry = telemetry
        # The writers' pool, not the one searches use.
        self.executor = executor
        self.limits = limits
        self.retry_s = retry_s
        self.watch_max_s = watch_max_s
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Condition()
        # The status of the job being run, as last recorded: watchers read it
        # here on every change instead of asking the database.
        self._running: dict[str, JobStatus] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Batches retried after a transient error (a locked or full database).
        self.retries = 0
        self.last_error = ""

    @property
    def healthy(self) -> bool:
        """Whether the worker task is running (health turns NOT_SERVING if not)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the worker task on the running loop; it is restarted if it ever ends."""
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="ingestion-worker")
        self._task.add_done_callback(self._restart)

    def _restart(self, task: asyncio.Task[None]) -> None:
        if self._stopping or task.cancelled():
            return
        log.error("the ingestion worker stopped (%r); restarting it", task.exception())
        self.start()

    async def stop(self) -> None:
        """Stop the worker; an unfinished job resumes at the next start."""
        self._stopping = True
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, namespace: str, documents: Sequence[Document]) -> str:
        """Validate the request's shape, persist the job, wake the worker."""
        namespace = resolve_namespace(namespace)
        validate_job(documents, self.limits)
        loop = asyncio.get_running_loop()
        pending = await loop.run_in_executor(self.executor, self.queue.pending_count)
        if pending >= self.limits.max_pending_jobs:
            raise ResourceExhausted(
                f"{pending} ingestion jobs are pending (limit {self.limits.max_pending_jobs}); "
                "retry when some have finished"
            )
        job_id = await loop.run_in_executor(self.executor, self.queue.submit, namespace, documents)
        self._wakeup.set()
        return job_id

    async def get(self, job_id: str) -> JobStatus:
        """Current status of a job."""
        validate_job_id(job_id)
        running = self._running.get(job_id)
        if running is not None:
            return running
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.queue.get, job_id)

    async def watch(self, job_id: str) -> AsyncIterator[JobStatus]:
        """The job's status now and after every change, until it is done."""
        validate_job_id(job_id)
        async for status in watch_job(self.get, job_id, self._wait_change, self.watch_max_s):
            yield status

    async def _wait_change(self) -> None:
        async with self._changed:
            # Woken by every recorded change. The timeout only covers a change
            # made between the watcher's get() and this wait; a running job's
            # status is then read from memory, not the database.
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=1.0)
            except TimeoutError:
                pass

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _in_thread(self, fn: Callable[..., T], *args: object) -> T:
        # In the worker's scope: when stop() cancels the task, the batch being
        # embedded stops at its next check instead of holding shutdown.
        return await deadlines.in_thread(self.executor, fn, *args)

    async def _run(self) -> None:
        deadlines.enter_call(None)
        while True:
            try:
                job = await self._in_thread(self.queue.next_queued)
            except Exception as exc:  # the queue itself failed: wait and retry
                if not transient(exc):
                    raise
                await self._backoff("reading the job queue", exc)
                continue
            if job is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._running[job.job_id] = job
            await self._notify()
            try:
                await self._run_job(job)
            finally:
                self._running.pop(job.job_id, None)
            await self._notify()

    async def _backoff(self, what: str, exc: BaseException) -> None:
        self.retries += 1
        self.last_error = f"{what}: {exc}"
        self.telemetry.record("ingestion_retries", 1)
        log.warning("ingestion: %s failed (%s); retrying in %.1f s", what, exc, self.retry_s)
        await asyncio.sleep(self.retry_s)

    async def _run_job(self, job: JobStatus) -> None:
        """Batches in order: read, prepare (validate, skip unchanged, embed),
        apply, commit progress. A transient failure retries the batch; a
        batch that fails otherwise fails its documents, and the job goes on.
        (Embedding the next batch while writing this one was measured slower:
        ONNX Runtime's spinning threads and the writer fight over 2 cores.)"""
        status = job
        while status.processed < status.total:
            try:
                documents = await self._in_thread(
                    self.queue.documents, job.job_id, status.processed, BATCH_DOCUMENTS
                )
                if not documents:
                    break
                prepared = await self._in_thread(self._prepare, job.namespace, documents)
                chunks = 0
                if prepared.documents:
                    result = await self._in_thread(self.retriever.apply_upsert, prepared)
                    chunks = result.chunks
                errors = prepared.errors
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if transient(exc):
                    await self._backoff(f"job {job.job_id}", exc)
                    continue
                log.exception("ingestion job %s: a batch failed", job.job_id)
                errors = tuple((d.id, f"ingestion failed: {exc}") for d in documents)
                chunks = 0
            status = replace(
                status,
                processed=status.processed + len(documents),
                failed=status.failed + len(errors),
                chunks=status.chunks + chunks,
                errors=status.errors + errors,
                updated_at=time.time(),
            )
            await self._record(status)
        status = replace(status, state=JobState.SUCCEEDED, updated_at=time.time())
        await self._record(status)
        log.info(
            "ingestion job %s done: %d documents, %d failed, %d chunks",
            job.job_id,
            status.processed,
            status.failed,
            status.chunks,
        )

    async def _record(self, status: JobStatus) -> None:
        """Commit progress, retrying while the database is locked or full:
        what was applied is idempotent, so nothing is lost by waiting."""
        while True:
            try:
                await self._in_thread(self.queue.record, status)
                self._running[status.job_id] = status
                break
            except Exception as exc:
                if not transient(exc):
                    raise
                await self._backoff(f"recording job {status.job_id}", exc)
        await self._notify()

    def _prepare(self, namespace: str, documents: list[Document]) -> PreparedUpsert:
        return self.retriever.prepare_upsert(namespace, documents, per_document=True)
