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
    WATCH_MAX_S,
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
        self.jobs_subject = f"{prefix.lower()}.jobs"
        self.writes_subject = f"{prefix.lower()}.writes"
        # The position this store keeps of the log it follows.
        self.log_name = f"nats:{self.writes_stream}"
        self.nc: Any = None
        self.js: Any = None
        self.kv: Any = None
        self.connected = asyncio.Event()
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
        await self._ensure_stream(
            api.StreamConfig(
                name=self.writes_stream,
                subjects=[self.writes_subject],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                num_replicas=replicas,
                duplicate_window=120.0,
            )
        )
        try:
            self.kv = await self.js.key_value(self.status_bucket)
        except nats.js.errors.BucketNotFoundError:
            self.kv = await self.js.create_key_value(
                bucket=self.status_bucket, history=1, replicas=replicas
            )
        self.applied = await self._in_thread(self.retriever.store.position, self.log_name)
        self.resumed_from = self.applied
        log.info("following %s from sequence %d", self.writes_stream, self.applied + 1)
        self.connected.set()

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        try:
            await self.js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(config)

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
                f"{what} failed: NATS at {self.where}: {exc or type(exc).__name__}; "
                "retry shortly"
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
        async for status in watch_job(self.get, job_id, lambda: asyncio.sleep(0.1), WATCH_MAX_S):
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
            try:
                await self._work_job(job_id, items)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                last_try = all(
                    m.metadata.num_delivered >= self.config.max_deliver for m, _ in items
                )
                log.exception("ingestion of job %s failed (final attempt: %s)", job_id, last_try)
                if last_try:
                    errors = [(b["doc"]["id"], f"ingestion failed: {exc}") for _, b in items]
                    await self._count(job_id, items, 0, errors)
                    for msg, _ in items:
                        await msg.ack()

    async def _work_job(self, job_id: str, items: list[tuple[Any, dict[str, Any]]]) -> None:
        status, _ = await self._load(job_id)
        if status.state == "FAILED":
            for msg, _ in items:
                await msg.ack()
            return
        items = [(m, b) for m, b in items if not status.has(b["seq"])]
        namespace = status.namespace
        errors: list[tuple[str, str]] = []
        documents: list[Document] = []
        for _, body in items:
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
        await self._count(job_id, items, chunks, errors)
        for msg, _ in items:
            await msg.ack()
        self.worked += len(items)

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
            except Exception:
                log.exception("following %s; resuming from %d", self.writes_stream, self.applied)
                await asyncio.sleep(1)

    async def _follow(self) -> None:
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
        prepared = await self._in_thread(self.retriever.prepare_upsert, namespace, documents)
        if not prepared.documents:
            generation = self.retriever.store.generation(prepared.namespace)
            return WriteResult(0, 0, generation, unchanged=len(prepared.unchanged))
        self.retriever.writes.check_upsert(prepared)
        result = await self._write(encode_prepared_upsert(prepared))
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
        writes = self.retriever.writes
        prepared = await self._in_thread(
            lambda: writes.prepare_delete(
                namespace, doc_ids, filter=filter, forget=forget, actor=actor
            )
        )
        return await self.apply_delete(prepared)

    async def apply_delete(self, prepared: PreparedDelete) -> WriteResult:
        """Publish a prepared deletion (checked as the appliers will check it)."""
        self.retriever.writes.check_delete(prepared)
        await self._ready()
        return await self._write(encode_prepared_delete(prepared))

    async def _write(self, payload: dict[str, Any]) -> WriteResult:
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
            return WriteResult(0, 0, 0)
        timeout = deadlines.remaining(self.config.apply_timeout_s)
        try:
            async with self._applied_changed:
                await asyncio.wait_for(
                    self._applied_changed.wait_for(lambda: self.applied >= seq), timeout
                )
        except TimeoutError:
            raise DeadlineExceeded(
                f"the write is in the log (sequence {seq}) but this replica has not applied "
                f"it within {timeout:.1f} s; it will be applied, check again later"
            ) from None
        outcome = self._results.pop(seq, WriteResult(0, 0, 0))
        if isinstance(outcome, RagError):
            raise outcome
        return outcome
