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

This module connects, follows the log (replicas) and publishes to it
(Submit, Upsert, Delete); the rest lives beside it: `nats_jobs` (a job's
messages and its status in the bucket), `nats_worker` (the worker),
`log_erasure` (erasing forgotten documents from the log), `nats_client`
(the errors NATS raises, message room).

Long (about 670 lines) on purpose: what is left is one object around one
connection and one log position. Following the log, the writers waiting on
their entry, the stall that refuses writes and the usage batches all read and
change the same state (applied sequence, log head, results by sequence, the
stall reason) under one asyncio loop; split further, each part would reach
back into the others' state, as the helpers above already do for theirs.
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

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from rag_grpc import deadlines
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
from rag_grpc.filters import Filter
from rag_grpc.index.retriever import Retriever
from rag_grpc.index.writes import PreparedDelete, PreparedUpsert
from rag_grpc.ingest.jobs import JobStatus, validate_job, validate_job_id, watch_job
from rag_grpc.ingest.log_entries import (
    decode_entry,
    encode_prepared_delete,
    encode_prepared_upsert,
    encode_usage,
    entry_bytes,
)
from rag_grpc.ingest.log_erasure import LogEraser
from rag_grpc.ingest.nats_client import NATS_ERRORS, PAYLOAD_MARGIN
from rag_grpc.ingest.nats_jobs import JobRecord, JobStatuses, job_message
from rag_grpc.ingest.nats_worker import QueueWorker
from rag_grpc.security.usage import UsageBatch, UsageLedger
from rag_grpc.telemetry import OFF, Recorder

log = logging.getLogger(__name__)

T = TypeVar("T")
# How often a replica drops its notes of which entries carried which
# documents for entries the log no longer holds.
PRUNE_INTERVAL_S = 600.0


class _Behind(Exception):
    """This replica cannot go on following the log (entries it needs are gone)."""


class NatsIngestion:
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
        # Why this replica stopped applying the log (None while it follows
        # it); once set, it refuses writes until restored from a backup.
        self.stalled: str | None = None
        # Called with that reason when it is set (the server reports the
        # replica NOT_SERVING).
        self.stall_listeners: list[Callable[[str], Awaitable[None]]] = []
        self._prune_at = 0.0
        self.applied = 0
        # The highest log sequence this process has seen exist (stream info,
        # deliveries with their pending count, its own publishes): the head
        # `log_lag` is measured from.
        self.log_head = 0
        # The log position this process found in its store at start.
        self.resumed_from = 0
        self._applied_changed = asyncio.Condition()
        # Outcomes of applied writes by log sequence, for the writer waiting
        # on them: a result, or the error the entry failed with.
        self._results: dict[int, WriteResult | RagError] = {}
        # Log entries that could not be applied (recorded as applied, skipped).
        self.apply_errors = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.pending_documents = 0
        # The usage ledger (with tenants, replicated): its sealed batches are
        # published here and every replica's are applied into it.
        self.usage: UsageLedger | None = None
        # The log's last sequence when this process connected.
        self._log_end_at_start = 0
        # Whether batches a previous run left in the outbox may be published
        # (they are not in the log, or have been applied from it since).
        self._usage_settled = False
        self.worker = QueueWorker(self)
        self.eraser = LogEraser(self)

    @property
    def log_lag(self) -> int:
        """Log entries this replica knows exist and has not applied yet."""
        return max(self.log_head - self.applied, 0)

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
        if self.usage is not None and self._usage_settled and self.nc.is_connected:
            try:
                await asyncio.to_thread(self.usage.flush)
                await asyncio.wait_for(self.publish_usage(), self.config.connect_timeout_s)
            except Exception as exc:
                # Kept in the ledger's outbox, published by the next run.
                log.warning(
                    "usage: the last batch was not published (kept for next start): %s", exc
                )
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
            self._tasks.append(asyncio.create_task(self._apply_forever(), name="nats-apply"))
        if self.run_worker:
            self._tasks.append(asyncio.create_task(self.worker.run(), name="nats-worker"))
        if self.usage is not None:
            self._tasks.append(
                asyncio.create_task(self._publish_usage_forever(), name="nats-usage")
            )

    async def _connect(self) -> None:
        self.nc = await nats.connect(
            # Several URLs (comma-separated): the nodes of a NATS cluster.
            servers=[url.strip() for url in self.config.nats_url.split(",") if url.strip()],
            connect_timeout=self.config.connect_timeout_s,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
        )
        self.js = self.nc.jetstream(timeout=self.config.connect_timeout_s)
        replicas = self.config.nats_replicas
        await self._ensure_stream(
            api.StreamConfig(
                name=self.jobs_stream,
                subjects=[self.jobs_subject],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                num_replicas=replicas,
                duplicate_window=120.0,
            )
        )
        max_age = self.config.log_max_age_s
        await self._ensure_stream(
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
        self.statuses.kv = await self._bucket(self.status_bucket)
        self.erased = await self._bucket(self.erased_bucket)
        self.applied = await self.in_thread(self.retriever.store.position, self.log_name)
        self.resumed_from = self.applied
        info = await self.js.stream_info(self.writes_stream)
        self._log_end_at_start = int(info.state.last_seq)
        log.info("following %s from sequence %d", self.writes_stream, self.applied + 1)
        self.connected.set()

    async def _ensure_stream(self, config: api.StreamConfig, retention: bool = False) -> None:
        """Create the stream, or with retention bring an existing one's limits
        (max_age, max_bytes) to the configured ones."""
        try:
            info = await self.js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(config)
            return
        current = info.config
        wanted = (config.max_age or 0.0, config.max_bytes or -1, config.duplicate_window)
        now = (current.max_age or 0.0, current.max_bytes or -1, current.duplicate_window or 0.0)
        if retention and any(abs(a - b) > 1e-3 for a, b in zip(wanted, now, strict=True)):
            await self.js.update_stream(
                current.evolve(
                    max_age=config.max_age,
                    max_bytes=config.max_bytes,
                    duplicate_window=config.duplicate_window,
                )
            )
            log.info(
                "%s now keeps entries for %s s and up to %s bytes (0/-1: no limit; was %s s, %s)",
                config.name,
                wanted[0],
                wanted[1],
                now[0],
                now[1],
            )

    async def _bucket(self, name: str) -> Any:
        try:
            return await self.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            return await self.js.create_key_value(
                bucket=name, history=1, replicas=self.config.nats_replicas
            )

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

    # -- replicas ------------------------------------------------------------

    async def _apply_forever(self) -> None:
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except _Behind as exc:
                await self._stall(str(exc))
                return
            except Exception:
                log.exception("following %s; resuming from %d", self.writes_stream, self.applied)
                await asyncio.sleep(1)

    async def _stall(self, why: str) -> None:
        """Stop following for good: skipping the missing entries would leave
        this store silently different from the others."""
        self.stalled = (
            f"this replica stopped applying the write log {self.writes_stream} after entry "
            f"{self.applied}: {why}. It refuses writes, and its searches answer from its store "
            "as of that entry. Restore it from a recent backup of a replica that is in step: "
            "`rag-grpc backup --target <that replica> --out peer.rag`, stop this server, move "
            "its data directory aside, `rag-grpc restore peer.rag --data-dir <its data "
            "directory>`, and start it again; it resumes the log from the backup's position"
        )
        log.error("%s", self.stalled)
        for listener in self.stall_listeners:
            try:
                await listener(self.stalled)
            except Exception:
                log.exception("reporting that this replica stopped applying the log")

    async def _check_window(self) -> None:
        """Raise _Behind when the log no longer holds every entry after this
        store's position; drop notes of entries it no longer holds."""
        info = await self.js.stream_info(self.writes_stream)
        first, last = int(info.state.first_seq), int(info.state.last_seq)
        self.log_head = max(self.log_head, last)
        if self.applied > last:
            raise _Behind(
                f"the log ends at entry {last}, before this store's position: the stream was "
                "deleted and created again, or this data directory follows another log"
            )
        if self.applied + 1 < first:
            await self._check_gap(self.applied + 1, first)
        await self.in_thread(
            lambda: self.retriever.store.drop_log_documents(self.log_name, below=first)
        )
        self._prune_at = time.monotonic() + PRUNE_INTERVAL_S

    async def _check_gap(self, start: int, end: int) -> None:
        """Entries start..end-1 are missing: fine if each was erased on purpose
        (its other documents published again later), else _Behind."""
        for seq in range(start, end):
            try:
                await self.erased.get(str(seq))
            except nats.js.errors.KeyNotFoundError:
                raise _Behind(
                    f"the log no longer holds entries {start} to {end - 1}, which it has not "
                    "applied: the log's retention (ingestion.log_max_age_s, log_max_bytes) "
                    "dropped them"
                ) from None

    async def _follow(self) -> None:
        await self._check_window()
        if self.applied:
            config = api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self.applied + 1,
            )
        else:
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
        sub = await self.js.subscribe(
            self.writes_subject, stream=self.writes_stream, ordered_consumer=True, config=config
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                seq = int(msg.metadata.sequence.stream)
                self.log_head = max(self.log_head, seq + int(msg.metadata.num_pending or 0))
                if seq <= self.applied:
                    continue
                if seq > self.applied + 1:
                    await self._check_gap(self.applied + 1, seq)
                if time.monotonic() > self._prune_at:
                    await self._check_window()
                result = await self.in_thread(self._apply, msg.data, seq)
                async with self._applied_changed:
                    self.applied = seq
                    self._results[seq] = result
                    while len(self._results) > 1024:
                        self._results.pop(next(iter(self._results)))
                    self._applied_changed.notify_all()
        finally:
            with contextlib.suppress(*NATS_ERRORS):
                await sub.unsubscribe()

    def _apply(self, data: bytes, seq: int) -> WriteResult | RagError:
        """Apply one log entry. An entry that cannot be applied (malformed,
        invalid, or refused by this store) is recorded as applied with its
        error: counted, logged once, never retried, so one bad entry cannot
        stop this replica applying the ones after it."""
        position = (self.log_name, seq)
        writes = self.retriever.writes
        try:
            try:
                record = json.loads(data)
            except ValueError as exc:
                raise InvalidArgument(f"malformed write: {exc}") from None
            prepared = decode_entry(record)
            if isinstance(prepared, UsageBatch):
                # Its own transaction skips it if already added (a crash
                # after that commit and before the position below).
                if self.usage is not None:
                    self.usage.apply_batch(prepared, self.log_name, seq)
                self.retriever.store.set_position(*position)
                return WriteResult(0, 0, 0)
            if isinstance(prepared, PreparedUpsert):
                # Noted before the write is applied (a fact about the log,
                # whatever the write's outcome here), so a forget finds every
                # entry holding the documents even if this process stops between.
                self.retriever.store.record_log_documents(
                    self.log_name,
                    seq,
                    prepared.namespace,
                    [d.id for d in prepared.documents if isinstance(d.id, str)],
                )
                return writes.apply_upsert(prepared, position)
            return writes.apply_delete(prepared, position)
        except (RagError, ValueError, TypeError) as exc:
            if not isinstance(exc, RagError):
                exc = InvalidArgument(f"the write cannot be applied: {exc}")
            self.apply_errors += 1
            self.telemetry.record("write_log_errors", 1)
            log.error("write %d of %s cannot be applied, skipped: %s", seq, self.writes_stream, exc)
            self.retriever.store.set_position(*position)
            return exc

    # -- usage -----------------------------------------------------------------

    async def _publish_usage_forever(self) -> None:
        """Every flush interval, publish the usage batches sealed here."""
        assert self.usage is not None
        if self.config.apply:
            # A batch left in the outbox by the previous run may be in the log
            # already: applying the log up to its end as of connecting takes
            # it out of the outbox first, so it is never published twice.
            async with self._applied_changed:
                await self._applied_changed.wait_for(lambda: self.applied >= self._log_end_at_start)
        self._usage_settled = True
        while True:
            await asyncio.sleep(self.usage.flush_interval_s)
            try:
                await self.publish_usage()
            except Exception:
                log.exception("usage: publishing to %s (will retry)", self.writes_stream)

    async def publish_usage(self) -> None:
        """Publish the ledger's sealed batches not published yet, oldest
        first; one that fails stays for the next try. The batch id is the
        entry's Nats-Msg-Id, so NATS drops a retry of one whose ack was lost
        (within its de-duplication window)."""
        ledger = self.usage
        if ledger is None:
            return
        for batch in ledger.unpublished():
            data = entry_bytes(encode_usage(batch))
            try:
                await self.js.publish(
                    self.writes_subject, data, headers={"Nats-Msg-Id": batch.batch_id}
                )
            except NATS_ERRORS as exc:
                log.warning("usage: NATS at %s: %s; publishing again shortly", self.where, exc)
                return
            await asyncio.to_thread(
                ledger.published, batch.batch_id, applied_here=self.config.apply
            )

    # -- writes from Upsert and Delete ----------------------------------------

    async def upsert(self, namespace: str, documents: Sequence[Document]) -> WriteResult:
        """Prepare here, publish to the log, return once applied here."""
        await self._ready()
        self._check_following()
        prepared = await self.in_thread(self.retriever.prepare_upsert, namespace, documents)
        if not prepared.documents:
            generation = self.retriever.store.generation(prepared.namespace)
            return WriteResult(0, 0, generation, unchanged=len(prepared.unchanged))
        self.retriever.writes.checks.check_upsert(prepared)
        result, _ = await self._write(encode_prepared_upsert(prepared))
        return WriteResult(
            len(prepared.documents),
            len(prepared.chunks),
            result.index_generation,
            unchanged=len(prepared.unchanged),
        )

    async def delete(
        self,
        namespace: str,
        doc_ids: Sequence[str],
        *,
        filter: Filter | None = None,
        forget: bool = False,
        actor: str = "",
    ) -> WriteResult:
        """Publish the deletion to the log, return once applied here. A
        filter is resolved to ids here, where the replicas' (converged)
        documents are the same."""
        self._check_following()
        writes = self.retriever.writes
        prepared = await self.in_thread(
            lambda: writes.prepare_delete(
                namespace, doc_ids, filter=filter, forget=forget, actor=actor
            )
        )
        return await self.apply_delete(prepared)

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
        self._check_following()
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

    def _check_following(self) -> None:
        if self.stalled:
            raise Unavailable(self.stalled)

    async def wait_applied(self, seq: int) -> None:
        """Return once this replica has applied the log up to seq."""
        timeout = deadlines.remaining(self.config.apply_timeout_s)
        try:
            async with self._applied_changed:
                await asyncio.wait_for(
                    self._applied_changed.wait_for(
                        lambda: self.applied >= seq or self.stalled is not None
                    ),
                    timeout,
                )
        except TimeoutError:
            raise DeadlineExceeded(
                f"the write is in the log (sequence {seq}) but this replica has not applied "
                f"it within {timeout:.1f} s; it will be applied, check again later"
            ) from None
        self._check_following()

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
        self.log_head = max(self.log_head, seq)
        if not self.config.apply:
            return WriteResult(0, 0, 0), seq
        await self.wait_applied(seq)
        outcome = self._results.pop(seq, WriteResult(0, 0, 0))
        if isinstance(outcome, RagError):
            raise outcome
        return outcome, seq
