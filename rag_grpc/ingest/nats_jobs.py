"""A NATS ingestion job: its documents as messages of the <P>_JOBS work
queue, and its status in the <P>_STATUS key-value bucket.

Several workers may finish batches of one job at once, and NATS may hand a
batch out again (a worker died before its ack), so the status keeps the
positions already counted (as merged ranges) and every change is a
compare-and-set on the bucket, retried when another worker changed it first:
each document is counted once."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.js.errors

from rag_grpc.documents import Document
from rag_grpc.errors import NotFound
from rag_grpc.ingest.document_json import document_from_json, document_to_json
from rag_grpc.ingest.job_status import JobState, JobStatus

log = logging.getLogger(__name__)

# Per-document errors kept in a job's status (the count is always exact).
MAX_ERRORS = 100


@dataclass
class JobRecord:
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
        """The status as IngestionService reports it."""
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
        """Whether the document at this position of the job is counted."""
        return any(start <= seq < end for start, end in self.done)

    def mark(self, seqs: Sequence[int]) -> None:
        """Note these positions as counted."""
        ranges = sorted([*self.done, *([s, s + 1] for s in seqs)])
        merged: list[list[int]] = []
        for start, end in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.done = merged

    def dump(self) -> bytes:
        """The bucket's value for this job."""
        return json.dumps(self.__dict__).encode()


def job_message(job_id: str, namespace: str, seq: int, doc: Document) -> bytes:
    """The <P>_JOBS message carrying the document at position seq of a job."""
    encoded = document_to_json(doc)
    return json.dumps({"job": job_id, "namespace": namespace, "seq": seq, "doc": encoded}).encode()


def decode_document(raw: dict[str, Any]) -> Document:
    """The document of a <P>_JOBS message (its "doc" field); ValueError if malformed."""
    return document_from_json(raw)


class JobStatuses:
    """The jobs' status in the <P>_STATUS bucket, one key per job id."""

    def __init__(self) -> None:
        # The key-value bucket, once connected.
        self.kv: Any = None

    async def put(self, record: JobRecord) -> None:
        """Store a job's status as it is (a new job, or one that failed to queue)."""
        await self.kv.put(record.job_id, record.dump())

    async def load(self, job_id: str) -> tuple[JobRecord, int]:
        """A job's status and its revision in the bucket; NotFound for an unknown job."""
        try:
            entry = await self.kv.get(job_id)
        except nats.js.errors.KeyNotFoundError:
            raise NotFound(f"job {job_id} does not exist") from None
        return JobRecord(**json.loads(entry.value)), entry.revision

    async def update(self, job_id: str, change: Callable[[JobRecord], bool]) -> None:
        """Change a job's status by compare-and-set on the bucket, retried when
        another worker changed it first; change returns False to leave it."""
        while True:
            status, revision = await self.load(job_id)
            if not change(status):
                return
            status.updated_at = time.time()
            try:
                await self.kv.update(job_id, status.dump(), last=revision)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue

    async def set_running(self, job_id: str) -> None:
        """A queued job becomes RUNNING (its first documents are being worked)."""

        def running(status: JobRecord) -> bool:
            if status.state != "QUEUED":
                return False
            status.state = "RUNNING"
            return True

        await self.update(job_id, running)

    async def count(
        self,
        job_id: str,
        seqs: Sequence[int],
        chunks: int,
        errors: Sequence[tuple[str, str]],
    ) -> None:
        """Add a batch (the documents at positions seqs) to its job's status once."""
        finished: list[JobRecord] = []

        def count(status: JobRecord) -> bool:
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

        await self.update(job_id, count)
        for status in finished:
            log.info(
                "ingestion job %s done: %d documents, %d failed, %d chunks",
                job_id,
                status.processed,
                status.failed,
                status.chunks,
            )
