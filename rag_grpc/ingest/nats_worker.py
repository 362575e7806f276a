"""The NATS ingestion worker: takes documents of the <P>_JOBS queue in
batches through the shared durable consumer, prepares them (validate, chunk,
embed), publishes the prepared writes to <P>_WRITES, counts them in their
job's status, then acks.

A document not acked within ingestion.ack_wait_s (its worker died, or the
batch failed) is delivered again, at most ingestion.max_deliver times; on
the last, it is counted as failed with its error. A batch that fails is
tried again document by document, so one document that can never be
written fails alone."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.js import api

from rag_grpc.documents import Document
from rag_grpc.index.writes import PreparedUpsert
from rag_grpc.ingest.log_entries import encode_prepared_upsert
from rag_grpc.ingest.nats_client import NATS_UNREACHABLE, PAYLOAD_MARGIN
from rag_grpc.ingest.nats_jobs import decode_document

if TYPE_CHECKING:
    from rag_grpc.ingest.nats_log import NatsIngestion

log = logging.getLogger(__name__)

# A message of the queue with its decoded body.
Item = tuple[Any, dict[str, Any]]


class QueueWorker:
    """One process's worker on the job queue of a NatsIngestion."""

    def __init__(self, ingestion: NatsIngestion) -> None:
        self.ingestion = ingestion
        self.config = ingestion.config
        # Documents this worker has taken from the queue and finished.
        self.worked = 0

    async def run(self) -> None:
        """Fetch and work batches until cancelled; errors are logged and retried."""
        ingestion = self.ingestion
        config = api.ConsumerConfig(
            ack_wait=self.config.ack_wait_s,
            max_deliver=self.config.max_deliver,
            max_ack_pending=10 * self.config.batch_documents,
        )
        sub = None
        while True:
            if ingestion.stalled:
                # Its store is behind: preparing against it would skip
                # documents as unchanged that the others no longer hold.
                await asyncio.sleep(1)
                continue
            try:
                if sub is None:
                    sub = await ingestion.js.pull_subscribe(
                        ingestion.jobs_subject, durable="rag-ingest",
                        stream=ingestion.jobs_stream, config=config,
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
        by_job: dict[str, list[Item]] = {}
        for msg in messages:
            try:
                body = json.loads(msg.data)
                by_job.setdefault(body["job"], []).append((msg, body))
            except (ValueError, KeyError):
                log.error("dropping a malformed message from %s", self.ingestion.jobs_stream)
                await msg.ack()
        for job_id, items in by_job.items():
            await self._work_items(job_id, items)

    async def _work_items(self, job_id: str, items: list[Item]) -> None:
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
        unreachable = isinstance(failure, NATS_UNREACHABLE) or not self.ingestion.nc.is_connected
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
            await self.ingestion.statuses.count(job_id, [b["seq"] for _, b in items], 0, errors)
            for msg, _ in items:
                await msg.ack()

    async def _work_job(self, job_id: str, items: list[Item]) -> None:
        ingestion = self.ingestion
        statuses = ingestion.statuses
        status, _ = await statuses.load(job_id)
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
                documents.append(decode_document(body["doc"]))
            except (KeyError, TypeError, ValueError) as exc:
                errors.append(("", f"malformed document: {exc}"))
        chunks = 0
        if documents:
            if status.state == "QUEUED":
                await statuses.set_running(job_id)
            prepared = await ingestion.in_thread(
                lambda: ingestion.retriever.prepare_upsert(namespace, documents, per_document=True)
            )
            errors += prepared.errors
            if prepared.documents:
                too_big, last_seq = await self._publish_writes(prepared)
                errors += too_big
                skipped = {doc_id for doc_id, _ in too_big}
                chunks = sum(1 for c in prepared.chunks if c.doc_id not in skipped)
                if (
                    last_seq
                    and ingestion.config.apply
                    and ingestion.retriever.writes.admission is not None
                ):
                    # Tenants' storage quotas are checked against this
                    # replica's store when a batch is prepared: the next batch
                    # must see this one applied, or a job could cross a quota
                    # by what it has in flight. (Workers on other replicas can
                    # still overshoot by their own batch in flight.)
                    await ingestion.follower.wait_applied(last_seq)
        if fresh:
            await statuses.count(job_id, [b["seq"] for _, b in fresh], chunks, errors)
        for msg, _ in items:
            await msg.ack()
        self.worked += len(fresh)

    async def _publish_writes(self, prepared: PreparedUpsert) -> tuple[list[tuple[str, str]], int]:
        """Publish a prepared upsert as log entries of at most max_payload
        bytes; returns the documents too large for one message and the log
        sequence of the last entry published (0: none)."""
        max_payload = self.ingestion.nc.max_payload
        by_doc: dict[str, list[Any]] = {}
        for chunk in prepared.chunks:
            by_doc.setdefault(chunk.doc_id, []).append(chunk)
        limit = max_payload - PAYLOAD_MARGIN
        errors: list[tuple[str, str]] = []
        batch: list[Document] = []
        size = 0
        last_seq = 0

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
                        f"max_payload of {max_payload}; split it or raise max_payload",
                    )
                )
                continue
            if batch and size + entry_size > limit:
                last_seq = await self._publish_write(part(batch))
                batch, size = [], 0
            batch.append(doc)
            size += entry_size
        if batch:
            last_seq = await self._publish_write(part(batch))
        return errors, last_seq

    async def _publish_write(self, prepared: PreparedUpsert) -> int:
        ingestion = self.ingestion
        # Checked as the appliers will check it: nothing that would fail
        # there is published.
        ingestion.retriever.writes.checks.check_upsert(prepared)
        payload = json.dumps(encode_prepared_upsert(prepared)).encode()
        # The same prepared write published twice (a redelivery within the
        # window) is stored once.
        msg_id = hashlib.sha256(payload).hexdigest()
        ack = await ingestion.js.publish(
            ingestion.writes_subject, payload, headers={"Nats-Msg-Id": msg_id}
        )
        return int(ack.seq)
