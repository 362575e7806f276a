"""Ingestion over NATS JetStream: a work queue of documents and a log of writes.

    Submit    -> <P>_JOBS: one message per document (a work queue, de-duplicated
                 by job id and position), and the job's status in the <P>_STATUS
                 key-value bucket.
    workers   -> pull documents in batches from the shared durable consumer,
                 validate, chunk and embed them, publish the prepared write to
                 <P>_WRITES, count them in the job's status, then ack. A worker
                 that dies before its ack has its documents redelivered.
    replicas  -> every process with a store follows <P>_WRITES in order, from
                 the position its SQLite committed with its last applied write,
                 so all replicas apply the same writes in the same order and
                 converge. Applying a write twice changes nothing.

<P>_WRITES keeps ingestion.log_max_age_s / log_max_bytes of entries. A replica
whose position is older than the oldest entry kept (stopped too long, or a
new one started from nothing after the log dropped its start) would miss
writes: it stops applying, refuses writes and says how to restore it from a
peer's backup (which carries the peer's log position).

Forgetting documents (Delete with forget) also erases every log entry that
carried a version of them; a replica that meets a missing sequence goes on
only if the <P>_ERASED bucket says it was erased on purpose.

Upsert and Delete calls go through the same log when this backend is on, and
return once this process has applied them (read-your-writes here; the other
replicas follow within their lag).

With tenants, usage travels on the same log: every flush interval this
process publishes the batch of counters its ledger sealed since the last
(`UsageLedger`, replicated), and every replica adds each usage entry to its
own ledger once, so all report the same totals.

This module is the backend object: it connects, and publishes to the log
(Submit, Upsert, Delete); the rest lives beside it: `log_follower` (applying
the log to this replica's store, the stall), `log_usage` (usage batches on
the log), `nats_jobs` (a job's messages and its status in the bucket),
`nats_worker` (the worker), `log_erasure` (erasing forgotten documents from
the log), `nats_client` (connecting, streams and buckets, the errors NATS
raises, message room). Those parts hold the ingestion and read its
connection and names; each keeps its own state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

from nats.js import api

from rag_grpc.config import IngestionConfig, LimitsConfig, redact_url
from rag_grpc.documents import Document, WriteResult, resolve_namespace
from rag_grpc.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    RagError,
    ResourceExhausted,
    Unavailable,
)
from rag_grpc.index.retriever import Retriever
from rag_grpc.index.writes import PreparedDelete
from rag_grpc.ingest.backend import WriteBackend
from rag_grpc.ingest.job_rules import validate_job, validate_job_id, watch_job
from rag_grpc.ingest.job_status import JobStatus
from rag_grpc.ingest.log_entries import encode_prepared_delete, encode_prepared_upsert
from rag_grpc.ingest.log_erasure import LogEraser
from rag_grpc.ingest.log_follower import LogFollower
from rag_grpc.ingest.log_usage import UsagePublisher
from rag_grpc.ingest.nats_client import (
    NATS_ERRORS,
    PAYLOAD_MARGIN,
    connect,
    ensure_stream,
    key_value,
)
from rag_grpc.ingest.nats_jobs import JobRecord, JobStatuses, job_message
from rag_grpc.ingest.nats_worker import QueueWorker
from rag_grpc.security.usage import UsageLedger
from rag_grpc.telemetry import OFF, Recorder

log = logging.getLogger(__name__)

T = TypeVar("T")


class NatsIngestion(WriteBackend):
    """IngestionService, Upsert and Delete over NATS JetStream (see the module docstring)."""

    def __init__(
        self,
        config: IngestionConfig,
        retriever: Retriever,
        executor: Executor | None,
        limits: LimitsConfig,
        *,
        worker: bool,
        telemetry: Recorder = OFF,
    ) -> None:
        self.config = config
        self.retriever = retriever
        # Where log entries that cannot be applied are counted (the server's
        # Telemetry, or OFF).
        self.telemetry = telemetry
        self.executor = executor
        self.limits = limits
        self.run_worker = worker and config.worker
        prefix = config.nats_prefix
        # The servers as logs and error messages name them: no credentials.
        self.where = redact_url(config.nats_url)
        self.jobs_stream = f"{prefix}_JOBS"
        self.writes_stream = f"{prefix}_WRITES"
        self.status_bucket = f"{prefix}_STATUS"
        # Sequences of <P>_WRITES erased on purpose (their other documents
        # published again), as opposed to dropped by retention.
        self.erased_bucket = f"{prefix}_ERASED"
        self.jobs_subject = f"{prefix.lower()}.jobs"
        self.writes_subject = f"{prefix.lower()}.writes"
        # The position this store keeps of the log it follows.
        self.log_name = f"nats:{self.writes_stream}"
        self.nc: Any = None
        self.js: Any = None
        # Jobs' status, in the <P>_STATUS bucket once connected.
        self.statuses = JobStatuses()
        self.erased: Any = None
        self.connected = asyncio.Event()
        # The log position this process found in its store at start.
        self.resumed_from = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.pending_documents = 0
        # The usage ledger (with tenants, replicated): its sealed batches are
        # published here and every replica's are applied into it.
        self.usage: UsageLedger | None = None
        self.follower = LogFollower(self)
        self.usage_publisher = UsagePublisher(self)
        self.worker = QueueWorker(self)
        self.eraser = LogEraser(self)

    @property
    def applied(self) -> int:
        """The last log sequence applied to this store."""
        return self.follower.applied

    @property
    def log_lag(self) -> int:
        """Log entries this replica knows exist and has not applied yet."""
        return self.follower.log_lag

    @property
    def stalled(self) -> str | None:
        """Why this replica stopped applying the log; None while it follows it."""
        return self.follower.stalled

    @property
    def stall_listeners(self) -> list[Callable[[str], Awaitable[None]]]:
        """Called with the reason when this replica stops applying the log."""
        return self.follower.stall_listeners

    @property
    def apply_errors(self) -> int:
        """Log entries that could not be applied here (skipped)."""
        return self.follower.apply_errors

    @property
    def worked(self) -> int:
        """Documents this process's worker has taken from the queue and finished."""
        return self.worker.worked

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (retrying), then run the worker and the applier."""
        self._tasks.append(asyncio.create_task(self._main(), name="nats-ingestion"))

    async def stop(self) -> None:
        """Stop the tasks, publish the usage counted since the last batch;
        unacknowledged documents go to another worker."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.usage_publisher.flush_at_stop()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(*NATS_ERRORS):
                await self.nc.close()

    async def _main(self) -> None:
        while True:
            try:
                await self._connect()
                break
            except NATS_ERRORS as exc:
                log.warning("NATS at %s: %s; retrying", self.where, exc)
                await asyncio.sleep(1)
        log.info("ingestion log on NATS JetStream at %s", self.where)
        if self.config.apply:
            self._tasks.append(asyncio.create_task(self.follower.run(), name="nats-apply"))
        if self.run_worker:
            self._tasks.append(asyncio.create_task(self.worker.run(), name="nats-worker"))
        if self.usage is not None:
            self._tasks.append(asyncio.create_task(self.usage_publisher.run(), name="nats-usage"))

    async def _connect(self) -> None:
        self.nc = await connect(self.config)
        self.js = self.nc.jetstream(timeout=self.config.connect_timeout_s)
        replicas = self.config.nats_replicas
        await ensure_stream(
            self.js,
            api.StreamConfig(
                name=self.jobs_stream,
                subjects=[self.jobs_subject],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                num_replicas=replicas,
                duplicate_window=120.0,
            ),
        )
        max_age = self.config.log_max_age_s
        await ensure_stream(
            self.js,
            api.StreamConfig(
                name=self.writes_stream,
                subjects=[self.writes_subject],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                num_replicas=replicas,
                max_age=max_age,
                max_bytes=self.config.log_max_bytes or -1,
                # NATS refuses a de-duplication window longer than max_age.
                duplicate_window=min(120.0, max_age) if max_age else 120.0,
            ),
            retention=True,
        )
        self.statuses.kv = await key_value(self.js, self.status_bucket, replicas)
        self.erased = await key_value(self.js, self.erased_bucket, replicas)
        position = await self.in_thread(self.retriever.store.position, self.log_name)
        self.follower.applied = self.resumed_from = position
        info = await self.js.stream_info(self.writes_stream)
        self.usage_publisher.log_end_at_start = int(info.state.last_seq)
        log.info("following %s from sequence %d", self.writes_stream, self.applied + 1)
        self.connected.set()

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn on the executor (store and embedding work block)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _ready(self) -> None:
        if not self.connected.is_set():
            raise Unavailable(f"not connected to NATS at {self.where} yet; retry shortly")
        if self.nc.is_closed or not self.nc.is_connected:
            raise Unavailable(f"NATS at {self.where} is unreachable; retry shortly")

    async def _nats(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except RagError:
            raise
        except NATS_ERRORS as exc:
            raise Unavailable(
                f"{what} failed: NATS at {self.where}: {exc or type(exc).__name__}; retry shortly"
            ) from None

    # -- jobs ----------------------------------------------------------------

    async def submit(self, namespace: str, documents: Sequence[Document]) -> str:
        """Queue the documents as one job; returns its id once NATS has them all."""
        namespace = resolve_namespace(namespace)
        validate_job(documents, self.limits)
        await self._ready()
        info = await self._nats("reading the job queue", self.js.stream_info(self.jobs_stream))
        self.pending_documents = int(info.state.messages)
        limit = self.config.max_pending_documents
        if self.pending_documents + len(documents) > limit:
            raise ResourceExhausted(
                f"{self.pending_documents} documents are waiting for ingestion workers (limit "
                f"{limit}); retry when some have been processed"
            )
        job_id = uuid.uuid4().hex
        now = time.time()
        status = JobRecord(
            job_id, namespace, "QUEUED", len(documents), created_at=now, updated_at=now
        )
        await self._nats("storing the job", self.statuses.put(status))
        messages = [job_message(job_id, namespace, seq, doc) for seq, doc in enumerate(documents)]
        try:
            for start in range(0, len(messages), 256):
                await asyncio.gather(
                    *(
                        self.js.publish(
                            self.jobs_subject,
                            payload,
                            headers={"Nats-Msg-Id": f"{job_id}:{start + i}"},
                        )
                        for i, payload in enumerate(messages[start : start + 256])
                    )
                )
        except NATS_ERRORS as exc:
            # Workers skip what was published of a failed job.
            status.state, status.updated_at = "FAILED", time.time()
            status.errors.append(["", f"the job was not fully queued: {exc}"])
            with contextlib.suppress(*NATS_ERRORS):
                await self.statuses.put(status)
            raise Unavailable(
                f"queueing the job failed: NATS at {self.where}: {exc}; submit again"
            ) from None
        self.pending_documents += len(messages)
        return job_id

    async def get(self, job_id: str) -> JobStatus:
        """A job's status; InvalidArgument for a malformed id, NotFound for an unknown one."""
        validate_job_id(job_id)
        await self._ready()
        status, _ = await self._nats("reading the job", self.statuses.load(job_id))
        return status.public()

    async def watch(self, job_id: str) -> AsyncIterator[JobStatus]:
        """The job's status now and after every change (polled), until it is done."""
        validate_job_id(job_id)
        wait = self.config.watch_max_s
        async for status in watch_job(self.get, job_id, lambda: asyncio.sleep(0.1), wait):
            yield status

    # -- writes from Upsert and Delete ----------------------------------------

    async def upsert(self, namespace: str, documents: Sequence[Document]) -> WriteResult:
        """Prepare here, publish to the log, return once applied here."""
        await self._ready()
        self.check_writable()
        prepared = await self.in_thread(self.retriever.prepare_upsert, namespace, documents)
        if not prepared.documents:
            return self.retriever.writes.unchanged_result(prepared)
        self.retriever.writes.checks.check_upsert(prepared)
        result, _ = await self._write(encode_prepared_upsert(prepared))
        return WriteResult(
            len(prepared.documents),
            len(prepared.chunks),
            result.index_generation,
            unchanged=len(prepared.unchanged),
        )

    async def apply_delete(self, prepared: PreparedDelete) -> WriteResult:
        """Publish a prepared deletion (checked as the appliers will check it);
        a forget then erases the forgotten documents from the log."""
        self.retriever.writes.checks.check_delete(prepared)
        if prepared.forget and not self.config.apply:
            raise FailedPrecondition(
                "this process does not apply the write log (ingestion.apply = false), so it "
                "cannot tell when the forgotten documents can be erased from NATS; send "
                "forget deletions to a replica"
            )
        await self._ready()
        self.check_writable()
        try:
            result, seq = await self._write(encode_prepared_delete(prepared))
        except DeadlineExceeded as exc:
            if not prepared.forget:
                raise
            raise DeadlineExceeded(
                f"{exc}; then run the same forget again to erase the documents from the log"
            ) from None
        if prepared.forget:
            await self.eraser.erase(prepared.namespace, prepared.ids, seq)
        return result

    def check_writable(self) -> None:
        """Unavailable once this replica stopped applying the log: a write
        prepared against its store could skip documents as unchanged that
        the others no longer hold."""
        self.follower.check_following()

    async def _write(self, payload: dict[str, Any]) -> tuple[WriteResult, int]:
        data = json.dumps(payload).encode()
        if len(data) > self.nc.max_payload - PAYLOAD_MARGIN:
            raise InvalidArgument(
                f"the write is {len(data)} bytes with its vectors, over NATS's max_payload of "
                f"{self.nc.max_payload}; send fewer or smaller documents per call"
            )
        ack = await self._nats(
            "publishing the write",
            self.js.publish(self.writes_subject, data, headers={"Nats-Msg-Id": uuid.uuid4().hex}),
        )
        seq = int(ack.seq)
        self.follower.saw(seq)
        if not self.config.apply:
            return WriteResult(0, 0, 0), seq
        await self.follower.wait_applied(seq)
        return self.follower.outcome(seq), seq
