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

Forgetting documents (Delete with forget) also erases, from NATS, every log
entry that carried a version of them (their text and vectors). The process
that published the forget does it once its replica has applied it: other
documents of those entries whose latest version they hold are published
again first (conditional on the log not having moved, so nothing newer is
overwritten), each erased sequence is recorded in the <P>_ERASED bucket, then
the entries are erased (NATS overwrites them on disk). A replica that meets a
missing sequence goes on only if that bucket says it was erased on purpose.

Upsert and Delete calls go through the same log when this backend is on, and
return once this process has applied them (read-your-writes here; the other
replicas follow within their lag).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from rag_grpc import deadlines, telemetry
from rag_grpc.config import IngestionConfig, LimitsConfig, redact_url
from rag_grpc.documents import Document, WriteResult, resolve_namespace
from rag_grpc.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RagError,
    ResourceExhausted,
    Unavailable,
)
from rag_grpc.filters import Filter
from rag_grpc.index.retriever import Retriever
from rag_grpc.index.writes import PreparedDelete, PreparedUpsert
from rag_grpc.ingest.jobs import (
    JobState,
    JobStatus,
    validate_job,
    validate_job_id,
    watch_job,
)
from rag_grpc.ingest.log_entries import (
    decode_prepared,
    encode_prepared_delete,
    encode_prepared_upsert,
    only_documents,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
# Per-document errors kept in a job's status (the count is always exact).
MAX_ERRORS = 100
# Room left in a message for headers and framing.
PAYLOAD_MARGIN = 4096
NATS_ERRORS = (
    nats.errors.Error,
    nats.js.errors.Error,
    TimeoutError,
    OSError,
)
# NATS could not be reached or had no leader to answer (a cluster electing):
# the next try may succeed, and every document of a batch would fail alike.
NATS_UNREACHABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
    OSError,
)
# JetStream's error for a publish whose Nats-Expected-Last-Sequence is not the
# stream's last sequence (another write came first).
WRONG_LAST_SEQUENCE = 10071
# Tries at republishing the other documents of entries to erase while other
# writes keep moving the log's end.
ERASE_ATTEMPTS = 20
# How often a replica drops its notes of which entries carried which
# documents for entries the log no longer holds.
PRUNE_INTERVAL_S = 600.0


class _Behind(Exception):
    """This replica cannot go on following the log (entries it needs are gone)."""


@dataclass
class _Status:
    """A job's status as kept in the bucket, with the positions already counted."""

    job_id: str
    namespace: str
    state: str
    total: int
    processed: int = 0
    failed: int = 0
    chunks: int = 0
    errors: list[list[str]] = field(default_factory=list)
    done: list[list[int]] = field(default_factory=list)  # merged [start, end) ranges
    created_at: float = 0.0
    updated_at: float = 0.0

    def public(self) -> JobStatus:
        return JobStatus(
            job_id=self.job_id,
            namespace=self.namespace,
            state=JobState(self.state),
            total=self.total,
            processed=self.processed,
            failed=self.failed,
            chunks=self.chunks,
            errors=tuple((e[0], e[1]) for e in self.errors),
            created_at=self.created_at,
            updated_at=self.updated_at,
        )

    def has(self, seq: int) -> bool:
        return any(start <= seq < end for start, end in self.done)

    def mark(self, seqs: Sequence[int]) -> None:
        ranges = sorted([*self.done, *([s, s + 1] for s in seqs)])
        merged: list[list[int]] = []
        for start, end in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.done = merged


def _encode_document(doc: Document) -> dict[str, Any]:
    return {"id": doc.id, "text": doc.text, "metadata": doc.metadata, "type": doc.content_type}


def _decode_document(raw: dict[str, Any]) -> Document:
    return Document(raw["id"], raw["text"], raw["metadata"], raw.get("type", ""))


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
    ) -> None:
        self.config = config
        self.retriever = retriever
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
        self.kv: Any = None
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
        # Documents this process's worker has taken from the queue and finished.
        self.worked = 0

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (retrying), then run the worker and the applier."""
        self._tasks.append(asyncio.create_task(self._main(), name="nats-ingestion"))

    async def stop(self) -> None:
        """Stop the tasks; unacknowledged documents go to another worker."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
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
            self._tasks.append(asyncio.create_task(self._work_forever(), name="nats-worker"))

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
        self.kv = await self._bucket(self.status_bucket)
        self.erased = await self._bucket(self.erased_bucket)
        self.applied = await self._in_thread(self.retriever.store.position, self.log_name)
        self.resumed_from = self.applied
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

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
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
        status = _Status(
            job_id, namespace, "QUEUED", len(documents), created_at=now, updated_at=now
        )
        await self._nats("storing the job", self.kv.put(job_id, self._dump(status)))
        messages = [
            json.dumps(
                {"job": job_id, "namespace": namespace, "seq": seq, "doc": _encode_document(doc)}
            ).encode()
            for seq, doc in enumerate(documents)
        ]
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
                await self.kv.put(job_id, self._dump(status))
            raise Unavailable(
                f"queueing the job failed: NATS at {self.where}: {exc}; submit again"
            ) from None
        self.pending_documents += len(messages)
        return job_id

    @staticmethod
    def _dump(status: _Status) -> bytes:
        return json.dumps(status.__dict__).encode()

    async def _load(self, job_id: str) -> tuple[_Status, int]:
        try:
            entry = await self.kv.get(job_id)
        except nats.js.errors.KeyNotFoundError:
            raise NotFound(f"job {job_id} does not exist") from None
        return _Status(**json.loads(entry.value)), entry.revision

    async def get(self, job_id: str) -> JobStatus:
        """A job's status; InvalidArgument for a malformed id, NotFound for an unknown one."""
        validate_job_id(job_id)
        await self._ready()
        status, _ = await self._nats("reading the job", self._load(job_id))
        return status.public()

    async def watch(self, job_id: str) -> AsyncIterator[JobStatus]:
        """The job's status now and after every change (polled), until it is done."""
        validate_job_id(job_id)
        wait = self.config.watch_max_s
        async for status in watch_job(self.get, job_id, lambda: asyncio.sleep(0.1), wait):
            yield status

    # -- workers -------------------------------------------------------------

    async def _work_forever(self) -> None:
        config = api.ConsumerConfig(
            ack_wait=self.config.ack_wait_s,
            max_deliver=self.config.max_deliver,
            max_ack_pending=10 * self.config.batch_documents,
        )
        sub = None
        while True:
            if self.stalled:
                # Its store is behind: preparing against it would skip
                # documents as unchanged that the others no longer hold.
                await asyncio.sleep(1)
                continue
            try:
                if sub is None:
                    sub = await self.js.pull_subscribe(
                        self.jobs_subject, durable="rag-ingest", stream=self.jobs_stream,
                        config=config,
                    )  # fmt: skip
                try:
                    messages = await sub.fetch(self.config.batch_documents, timeout=1)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                await self._work(messages)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ingestion worker; retrying")
                await asyncio.sleep(1)

    async def _work(self, messages: list[Any]) -> None:
        by_job: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
        for msg in messages:
            try:
                body = json.loads(msg.data)
                by_job.setdefault(body["job"], []).append((msg, body))
            except (ValueError, KeyError):
                log.error("dropping a malformed message from %s", self.jobs_stream)
                await msg.ack()
        for job_id, items in by_job.items():
            await self._work_items(job_id, items)

    async def _work_items(self, job_id: str, items: list[tuple[Any, dict[str, Any]]]) -> None:
        """Work a job's documents of a batch; when the batch fails, each alone,
        so one document that can never be written (say, an entry NATS
        refuses) fails by itself after max_deliver tries, not its batch-mates."""
        try:
            await self._work_job(job_id, items)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failure = exc
        unreachable = isinstance(failure, NATS_UNREACHABLE) or not self.nc.is_connected
        if len(items) > 1 and not unreachable:
            log.warning(
                "ingestion of %d documents of job %s failed (%s); trying them one by one",
                len(items),
                job_id,
                failure,
            )
            for item in items:
                await self._work_items(job_id, [item])
            return
        delivered = min(m.metadata.num_delivered for m, _ in items)
        last_try = delivered >= self.config.max_deliver
        log.error(
            "ingestion of job %s failed (delivery %d of %d)",
            job_id,
            delivered,
            self.config.max_deliver,
            exc_info=failure,
        )
        if last_try:
            errors = [
                (b["doc"]["id"], f"ingestion failed after {delivered} attempts: {failure}")
                for _, b in items
            ]
            await self._count(job_id, items, 0, errors)
            for msg, _ in items:
                await msg.ack()

    async def _work_job(self, job_id: str, items: list[tuple[Any, dict[str, Any]]]) -> None:
        status, _ = await self._load(job_id)
        if status.state == "FAILED":
            for msg, _ in items:
                await msg.ack()
            return
        # Documents counted already come again when their worker died between
        # counting and acking: acked below, not worked again.
        fresh = [(m, b) for m, b in items if not status.has(b["seq"])]
        namespace = status.namespace
        errors: list[tuple[str, str]] = []
        documents: list[Document] = []
        for _, body in fresh:
            try:
                documents.append(_decode_document(body["doc"]))
            except (KeyError, TypeError, ValueError) as exc:
                errors.append(("", f"malformed document: {exc}"))
        chunks = 0
        if documents:
            if status.state == "QUEUED":
                await self._set_running(job_id)
            prepared = await self._in_thread(
                lambda: self.retriever.prepare_upsert(namespace, documents, per_document=True)
            )
            errors += prepared.errors
            if prepared.documents:
                too_big = await self._publish_writes(prepared)
                errors += too_big
                skipped = {doc_id for doc_id, _ in too_big}
                chunks = sum(1 for c in prepared.chunks if c.doc_id not in skipped)
        await self._count(job_id, fresh, chunks, errors)
        for msg, _ in items:
            await msg.ack()
        self.worked += len(fresh)

    async def _set_running(self, job_id: str) -> None:
        def running(status: _Status) -> bool:
            if status.state != "QUEUED":
                return False
            status.state = "RUNNING"
            return True

        await self._update(job_id, running)

    async def _update(self, job_id: str, change: Callable[[_Status], bool]) -> None:
        """Change a job's status by compare-and-set on the bucket, retried when
        another worker changed it first; change returns False to leave it."""
        while True:
            status, revision = await self._load(job_id)
            if not change(status):
                return
            status.updated_at = time.time()
            try:
                await self.kv.update(job_id, self._dump(status), last=revision)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue

    async def _publish_writes(self, prepared: PreparedUpsert) -> list[tuple[str, str]]:
        """Publish a prepared upsert as log entries of at most max_payload
        bytes; returns the documents too large for one message."""
        by_doc: dict[str, list[Any]] = {}
        for chunk in prepared.chunks:
            by_doc.setdefault(chunk.doc_id, []).append(chunk)
        limit = self.nc.max_payload - PAYLOAD_MARGIN
        errors: list[tuple[str, str]] = []
        batch: list[Document] = []
        size = 0

        def part(docs: list[Document]) -> PreparedUpsert:
            return PreparedUpsert(
                prepared.namespace,
                tuple(docs),
                tuple(c for d in docs for c in by_doc.get(d.id, [])),
                written_at=prepared.written_at,
            )

        for doc in prepared.documents:
            entry_size = len(json.dumps(encode_prepared_upsert(part([doc]))))
            if entry_size > limit:
                errors.append(
                    (
                        doc.id,
                        f"document {doc.id!r} with its vectors is {entry_size} bytes, over NATS's "
                        f"max_payload of {self.nc.max_payload}; split it or raise max_payload",
                    )
                )
                continue
            if batch and size + entry_size > limit:
                await self._publish_write(part(batch))
                batch, size = [], 0
            batch.append(doc)
            size += entry_size
        if batch:
            await self._publish_write(part(batch))
        return errors

    async def _publish_write(self, prepared: PreparedUpsert) -> int:
        # Checked as the appliers will check it: nothing that would fail
        # there is published.
        self.retriever.writes.check_upsert(prepared)
        payload = json.dumps(encode_prepared_upsert(prepared)).encode()
        # The same prepared write published twice (a redelivery within the
        # window) is stored once.
        msg_id = hashlib.sha256(payload).hexdigest()
        ack = await self.js.publish(self.writes_subject, payload, headers={"Nats-Msg-Id": msg_id})
        return int(ack.seq)

    async def _count(
        self,
        job_id: str,
        items: list[tuple[Any, dict[str, Any]]],
        chunks: int,
        errors: list[tuple[str, str]],
    ) -> None:
        """Add a batch to its job's status once."""
        seqs = [b["seq"] for _, b in items]
        finished: list[_Status] = []

        def count(status: _Status) -> bool:
            finished.clear()  # from an attempt another worker's update beat
            new = [s for s in seqs if not status.has(s)]
            if not new:
                return False  # counted already (a redelivered batch)
            status.mark(new)
            status.processed += len(new)
            status.failed += len(errors)
            status.chunks += chunks
            room = MAX_ERRORS - len(status.errors)
            status.errors += [[i, m] for i, m in errors[: max(0, room)]]
            if status.processed >= status.total:
                status.state = "SUCCEEDED"
                finished.append(status)
            elif status.state == "QUEUED":
                status.state = "RUNNING"
            return True

        await self._update(job_id, count)
        for status in finished:
            log.info(
                "ingestion job %s done: %d documents, %d failed, %d chunks",
                job_id,
                status.processed,
                status.failed,
                status.chunks,
            )

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
        if self.applied > last:
            raise _Behind(
                f"the log ends at entry {last}, before this store's position: the stream was "
                "deleted and created again, or this data directory follows another log"
            )
        if self.applied + 1 < first:
            await self._check_gap(self.applied + 1, first)
        await self._in_thread(
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
                if seq <= self.applied:
                    continue
                if seq > self.applied + 1:
                    await self._check_gap(self.applied + 1, seq)
                if time.monotonic() > self._prune_at:
                    await self._check_window()
                result = await self._in_thread(self._apply, msg.data, seq)
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
            prepared = decode_prepared(record)
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
            telemetry.record("write_log_errors", 1)
            log.error("write %d of %s cannot be applied, skipped: %s", seq, self.writes_stream, exc)
            self.retriever.store.set_position(*position)
            return exc

    # -- writes from Upsert and Delete ----------------------------------------

    async def upsert(self, namespace: str, documents: Sequence[Document]) -> WriteResult:
        """Prepare here, publish to the log, return once applied here."""
        await self._ready()
        self._check_following()
        prepared = await self._in_thread(self.retriever.prepare_upsert, namespace, documents)
        if not prepared.documents:
            generation = self.retriever.store.generation(prepared.namespace)
            return WriteResult(0, 0, generation, unchanged=len(prepared.unchanged))
        self.retriever.writes.check_upsert(prepared)
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
        prepared = await self._in_thread(
            lambda: writes.prepare_delete(
                namespace, doc_ids, filter=filter, forget=forget, actor=actor
            )
        )
        return await self.apply_delete(prepared)

    async def apply_delete(self, prepared: PreparedDelete) -> WriteResult:
        """Publish a prepared deletion (checked as the appliers will check it);
        a forget then erases the forgotten documents from the log."""
        self.retriever.writes.check_delete(prepared)
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
            await self._erase_from_log(prepared.namespace, prepared.ids, seq)
        return result

    def _check_following(self) -> None:
        if self.stalled:
            raise Unavailable(self.stalled)

    async def _wait_applied(self, seq: int) -> None:
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
        if not self.config.apply:
            return WriteResult(0, 0, 0), seq
        await self._wait_applied(seq)
        outcome = self._results.pop(seq, WriteResult(0, 0, 0))
        if isinstance(outcome, RagError):
            raise outcome
        return outcome, seq

    # -- erasing forgotten documents from the log -------------------------------

    async def _erase_from_log(
        self, namespace: str, doc_ids: Sequence[str], forget_seq: int
    ) -> None:
        """Erase every entry before the forget that carried a version of these
        documents, once the other documents those entries hold are safe."""
        store = self.retriever.store
        carried = await self._in_thread(store.log_documents, self.log_name, namespace, doc_ids)
        seqs = sorted({s for found in carried.values() for s in found if s < forget_seq})
        if not seqs:
            return
        try:
            doomed, republished = await self._republish_others(namespace, set(doc_ids), seqs)
            # Recorded before erasing: a replica that then finds the entry
            # missing must know it was erased on purpose, not dropped.
            for seq in doomed:
                await self.erased.put(str(seq), str(forget_seq).encode())
            for seq in doomed:
                await self._erase_entry(seq)
        except NATS_ERRORS as exc:
            raise Unavailable(
                f"the documents are forgotten by the replicas, but erasing their copies from "
                f"the NATS log at {self.where} failed: {exc or type(exc).__name__}; run the same "
                "forget again to finish"
            ) from None
        await self._in_thread(lambda: store.drop_log_documents(self.log_name, seqs=seqs))
        log.info(
            "erased %d entries of %s that held forgotten documents of %s "
            "(%d other documents published again first)",
            len(doomed),
            self.writes_stream,
            namespace,
            republished,
        )

    async def _republish_others(
        self, namespace: str, forgotten: set[str], seqs: list[int]
    ) -> tuple[list[int], int]:
        """Publish again the other documents of the entries to erase whose
        latest version they hold, so a replica that has not applied those
        entries yet still ends with them. Returns the entries to erase and
        how many documents were published again.

        Decided on this replica's store at the log's end and published only
        if the log has not moved since (Nats-Expected-Last-Sequence): a
        newer write to one of those documents is never overwritten."""
        store = self.retriever.store
        for _ in range(ERASE_ATTEMPTS):
            info = await self.js.stream_info(self.writes_stream)
            last = int(info.state.last_seq)
            try:
                await self._wait_applied(last)
            except DeadlineExceeded:
                raise DeadlineExceeded(
                    "the documents are forgotten by this replica, but it had not caught up "
                    f"with the log's end (entry {last}) in time to erase their copies from "
                    "it; run the same forget again to finish"
                ) from None
            if await self._in_thread(store.position, self.log_name) != last:
                continue  # written meanwhile; decide again at the new end
            doomed: list[int] = []
            keep: list[PreparedUpsert] = []
            for seq in seqs:
                try:
                    msg = await self.js.get_msg(self.writes_stream, seq)
                except nats.js.errors.NotFoundError:
                    continue  # dropped by retention, or erased by an earlier forget
                try:
                    entry = decode_prepared(json.loads(msg.data))
                except (ValueError, InvalidArgument):
                    doomed.append(seq)  # nothing in it was ever applied
                    continue
                if not isinstance(entry, PreparedUpsert) or entry.namespace != namespace:
                    continue
                ids = {d.id for d in entry.documents}
                if not ids & forgotten:
                    continue
                doomed.append(seq)
                if ids - forgotten:
                    keep.append(await self._in_thread(self._latest_in, entry, seq, forgotten))
            if await self._in_thread(store.position, self.log_name) != last:
                continue
            expected, count = last, 0
            try:
                for part in keep:
                    if not part.documents:
                        continue
                    payload = json.dumps(encode_prepared_upsert(part)).encode()
                    ack = await self.js.publish(
                        self.writes_subject,
                        payload,
                        headers={"Nats-Expected-Last-Sequence": str(expected)},
                    )
                    expected, count = int(ack.seq), count + len(part.documents)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
                # Another write came first. What was published is the latest
                # version of its documents at that point, so harmless; decide again.
                continue
            return doomed, count
        raise Unavailable(
            f"the documents are forgotten by the replicas, but writes kept arriving while "
            f"{ERASE_ATTEMPTS} tries to erase their copies from the log ran; run the same "
            "forget again to finish"
        )

    def _latest_in(self, entry: PreparedUpsert, seq: int, forgotten: set[str]) -> PreparedUpsert:
        """The documents of the entry (not forgotten) that this store holds as
        the entry wrote them and that no later entry carries."""
        store = self.retriever.store
        others = [d for d in entry.documents if d.id not in forgotten]
        same = store.unchanged(entry.namespace, others)
        carried = store.log_documents(self.log_name, entry.namespace, list(same))
        return only_documents(entry, {i for i in same if carried.get(i, [seq])[-1] == seq})

    async def _erase_entry(self, seq: int) -> None:
        # The JetStream API itself, to say no_erase = false: NATS overwrites
        # the message where it lies on disk instead of only unlinking it.
        reply = await self.nc.request(
            f"$JS.API.STREAM.MSG.DELETE.{self.writes_stream}",
            json.dumps({"seq": seq, "no_erase": False}).encode(),
            timeout=self.config.connect_timeout_s,
        )
        error = json.loads(reply.data).get("error")
        if not error:
            return
        try:
            await self.js.get_msg(self.writes_stream, seq)
        except nats.js.errors.NotFoundError:
            return  # gone already (retention, or another forget erased it)
        raise Unavailable(
            f"NATS at {self.where} did not erase entry {seq} of {self.writes_stream}: "
            f"{error.get('description', error)}; run the same forget again to finish"
        )
