"""The SQLite job queue and its worker (IngestionManager) built directly over
a Retriever with the word embedder: jobs run to the end, bad documents fail
alone, the queue's limits hold, transient errors are retried and a job left
running by a crash resumes. (What every job backend enforces, the shape of a
job and of its id, is tested in test_job_rules.py.)"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from rag_grpc.config import LimitsConfig
from rag_grpc.documents import Document
from rag_grpc.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from rag_grpc.index.query import SearchQuery
from rag_grpc.index.retriever import Retriever
from rag_grpc.ingest.job_status import JobState, JobStatus
from rag_grpc.ingest.jobs import IngestionManager, JobQueue, transient
from tests.conftest import CORPUS
from tests.ingest.conftest import run_with


async def finished(manager: IngestionManager, job_id: str) -> JobStatus:
    """The job's status once done (watching it)."""
    last = None
    async for status in manager.watch(job_id):
        last = status
    assert last is not None and last.done, last
    return last


def test_a_job_runs_to_the_end_and_its_documents_are_searchable(
    tmp_path: Path, retriever: Retriever
) -> None:
    queue = JobQueue(tmp_path / "jobs.sqlite3")

    async def body(manager: IngestionManager) -> JobStatus:
        return await finished(manager, await manager.submit("", CORPUS))

    status = run_with(queue, retriever, body)
    assert status.state is JobState.SUCCEEDED
    assert (status.namespace, status.total, status.processed, status.failed) == (
        "default",
        5,
        5,
        0,
    )
    assert status.chunks == 5 and status.errors == ()
    assert status.created_at <= status.updated_at
    hits = retriever.search(SearchQuery(text="espresso crema", k=1)).hits
    assert [h.document_id for h in hits] == ["espresso"]
    # A finished job keeps its status, not its documents.
    assert queue.get(status.job_id) == status
    assert queue.documents(status.job_id, 0, 10) == []


def test_a_bad_document_fails_alone_with_its_reason(tmp_path: Path, retriever: Retriever) -> None:
    queue = JobQueue(tmp_path / "jobs.sqlite3")
    docs = [CORPUS[0], Document("bad", "text", {"not a key": 1}), CORPUS[1]]

    async def body(manager: IngestionManager) -> JobStatus:
        return await finished(manager, await manager.submit("ns", docs))

    status = run_with(queue, retriever, body)
    assert status.state is JobState.SUCCEEDED
    assert (status.processed, status.failed) == (3, 1)
    ((doc_id, reason),) = status.errors
    assert doc_id == "bad" and "not a key" in reason
    found, missing = retriever.get("ns", ["volcano", "bad", "photosynthesis"])
    assert [d.id for d in found] == ["volcano", "photosynthesis"] and missing == ["bad"]


def test_watch_sees_the_job_progress_in_order(tmp_path: Path, retriever: Retriever) -> None:
    queue = JobQueue(tmp_path / "jobs.sqlite3")
    docs = [Document(f"d{i}", f"document number {i}") for i in range(300)]  # 3 batches

    async def body(manager: IngestionManager) -> list[JobStatus]:
        job_id = await manager.submit("", docs)
        return [s async for s in manager.watch(job_id)]

    seen = run_with(queue, retriever, body)
    assert seen[-1].state is JobState.SUCCEEDED and seen[-1].processed == 300
    processed = [s.processed for s in seen]
    assert processed == sorted(processed)
    assert all(not s.done for s in seen[:-1])
    assert len(set(seen)) == len(seen)  # one event per change


def test_pending_jobs_are_bounded(tmp_path: Path, retriever: Retriever) -> None:
    queue = JobQueue(tmp_path / "jobs.sqlite3")

    async def body(manager: IngestionManager) -> None:
        await manager.submit("", [Document("a", "x")])
        await manager.submit("", [Document("b", "y")])
        with pytest.raises(ResourceExhausted, match="2 ingestion jobs are pending"):
            await manager.submit("", [Document("c", "z")])

    # No worker: the jobs stay queued.
    run_with(queue, retriever, body, limits=LimitsConfig(max_pending_jobs=2), start=False)
    assert queue.pending_count() == 2


def test_a_job_a_crash_left_running_resumes_where_it_stopped(
    tmp_path: Path, retriever: Retriever
) -> None:
    path = tmp_path / "jobs.sqlite3"
    queue = JobQueue(path)
    job_id = queue.submit("default", CORPUS)
    running = queue.next_queued()
    assert running is not None and running.state is JobState.RUNNING
    # Two documents were done and recorded, then the process died.
    retriever.upsert("", CORPUS[:2])
    queue.record(JobStatus(**{**running.__dict__, "processed": 2, "chunks": 2}))
    queue.close()

    again = JobQueue(path)
    assert again.get(job_id).state is JobState.QUEUED

    status = run_with(again, retriever, lambda manager: finished(manager, job_id))
    assert status.state is JobState.SUCCEEDED
    assert (status.processed, status.chunks) == (5, 5)  # the rest only, counted once
    assert retriever.stats()[0].documents == 5


def test_a_transient_failure_retries_the_batch(
    tmp_path: Path, retriever: Retriever, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = JobQueue(tmp_path / "jobs.sqlite3")
    apply = retriever.apply_upsert
    failures = iter([sqlite3.OperationalError("database is locked")])

    def flaky(*args: object) -> object:
        for exc in failures:
            raise exc
        return apply(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(retriever, "apply_upsert", flaky)
    managers: list[IngestionManager] = []

    async def body(manager: IngestionManager) -> JobStatus:
        managers.append(manager)
        return await finished(manager, await manager.submit("", CORPUS))

    status = run_with(queue, retriever, body)
    assert status.state is JobState.SUCCEEDED and status.failed == 0
    assert managers[0].retries == 1
    assert "locked" in managers[0].last_error


def test_a_batch_failing_for_good_fails_its_documents_and_the_job_goes_on(
    tmp_path: Path, retriever: Retriever, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = JobQueue(tmp_path / "jobs.sqlite3")

    def broken(*args: object) -> object:
        raise ValueError("no such vector")

    monkeypatch.setattr(retriever, "apply_upsert", broken)

    async def body(manager: IngestionManager) -> JobStatus:
        status = await finished(manager, await manager.submit("", CORPUS[:2]))
        assert manager.retries == 0
        return status

    status = run_with(queue, retriever, body)
    assert status.state is JobState.SUCCEEDED
    assert (status.processed, status.failed) == (2, 2)
    assert [doc_id for doc_id, _ in status.errors] == ["volcano", "photosynthesis"]
    assert all("no such vector" in reason for _, reason in status.errors)


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (Unavailable("remote down"), True),
        (ResourceExhausted("queue full"), True),
        (sqlite3.OperationalError("database is locked"), True),
        (sqlite3.OperationalError("database or disk is full"), True),
        (sqlite3.OperationalError("disk I/O error"), True),
        (sqlite3.OperationalError("unable to open database file"), True),
        (OSError("read-only file system"), True),
        (sqlite3.OperationalError("no such table: chunks"), False),
        (sqlite3.IntegrityError("UNIQUE constraint failed"), False),
        (InvalidArgument("bad document"), False),
        (NotFound("gone"), False),
        (ValueError("disk I/O error"), False),  # the words alone do not make it transient
    ],
)
def test_transient_errors_are_those_a_retry_can_fix(exc: BaseException, retry: bool) -> None:
    assert transient(exc) is retry
