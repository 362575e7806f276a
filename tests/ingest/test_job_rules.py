"""What every job backend enforces (rag_grpc/ingest/job_rules.py), seen
through the SQLite one: a malformed job is refused before it is queued, job
ids are checked before they are looked up, and a watch ends after its maximum
duration (a watcher then watches again)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rag_grpc.client import RagClient
from rag_grpc.config import LimitsConfig
from rag_grpc.documents import Document
from rag_grpc.errors import InvalidArgument, NotFound
from rag_grpc.index.retriever import Retriever
from rag_grpc.ingest.job_rules import validate_job_id
from rag_grpc.ingest.jobs import IngestionManager, JobQueue
from tests.conftest import ServerThread
from tests.ingest.conftest import run_with


@pytest.mark.parametrize(
    ("docs", "message"),
    [
        ([], "at least one"),
        ([Document("a", "x"), Document("a", "y")], "more than once"),
        ([Document("", "x")], "must not be empty"),
        ([Document(str(i), "x") for i in range(4)], "at most 3"),
    ],
    ids=["empty", "duplicate", "bad-id", "too-many"],
)
def test_a_malformed_job_is_refused_before_it_is_queued(
    tmp_path: Path, retriever: Retriever, docs: list[Document], message: str
) -> None:
    queue = JobQueue(tmp_path / "jobs.sqlite3")

    async def body(manager: IngestionManager) -> None:
        with pytest.raises(InvalidArgument, match=message):
            await manager.submit("", docs)
        with pytest.raises(InvalidArgument):
            await manager.submit("../up", [Document("a", "x")])

    run_with(queue, retriever, body, limits=LimitsConfig(max_job_documents=3), start=False)
    assert queue.pending_count() == 0


def test_job_ids_are_checked_before_they_are_looked_up(
    tmp_path: Path, retriever: Retriever
) -> None:
    queue = JobQueue(tmp_path / "jobs.sqlite3")

    async def body(manager: IngestionManager) -> None:
        for bad in ("", "x" * 32, "0" * 31, "A" * 32, "0" * 33, "0" * 31 + "'"):
            with pytest.raises(InvalidArgument):
                await manager.get(bad)
        with pytest.raises(NotFound):
            await manager.get("0" * 32)

    run_with(queue, retriever, body, start=False)
    validate_job_id("0123456789abcdef" * 2)


def test_a_watch_ends_after_its_maximum_duration(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(ingestion={"watch_max_s": 1.0})
    words = " ".join(f"w{i}" for i in range(180))
    with RagClient(server.target) as client:
        job = client.submit([Document(f"d{i}", f"{i} {words}") for i in range(300)])
        watches: list[list[Any]] = []
        while not watches or watches[-1][-1].state != "SUCCEEDED":
            started = time.monotonic()
            watches.append(list(client.watch_job(job, timeout=600)))
            assert time.monotonic() - started < 60
        # The first streams ended while the job ran on; watching again went on.
        assert len(watches) > 1 and watches[0][-1].state in ("QUEUED", "RUNNING")
        assert watches[-1][-1].processed == 300
