"""A NATS job's status without a NATS server: the counted positions kept as
merged [start, end) ranges, the compare-and-set that counts each document
once, the state a job reaches, and how NATS failures become our errors.
(test_nats_log.py and test_nats_worker.py run the same against real NATS servers.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
import pytest

from rag_grpc.config import IngestionConfig, LimitsConfig
from rag_grpc.documents import Document
from rag_grpc.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from rag_grpc.ingest.job_status import JobState
from rag_grpc.ingest.nats_client import NATS_ERRORS, NATS_UNREACHABLE
from rag_grpc.ingest.nats_jobs import MAX_ERRORS, JobRecord, JobStatuses, job_message
from rag_grpc.ingest.nats_log import NatsIngestion
from tests.in_process import open_retriever

T = TypeVar("T")
JOB = "0123456789abcdef0123456789abcdef"


# -- the ranges of counted positions -----------------------------------------


def record(total: int = 10, **fields: Any) -> JobRecord:
    return JobRecord(JOB, "default", "QUEUED", total, **fields)


@pytest.mark.parametrize(
    ("marks", "ranges"),
    [
        ([[0]], [[0, 1]]),
        ([[0, 1, 2]], [[0, 3]]),
        ([[2], [0]], [[0, 1], [2, 3]]),  # a gap stays a gap
        ([[2], [0], [1]], [[0, 3]]),  # filling it joins both sides
        ([[0, 1], [1, 2]], [[0, 3]]),  # overlapping marks count once
        ([[5], [5]], [[5, 6]]),
        ([[3], [4]], [[3, 5]]),  # adjacent ranges ([3,4) and [4,5)) merge
        ([[9, 7, 8]], [[7, 10]]),  # order of positions does not matter
        ([[0], [2], [4], [3], [1]], [[0, 5]]),
    ],
)
def test_marked_positions_merge_into_ranges(
    marks: list[list[int]], ranges: list[list[int]]
) -> None:
    status = record()
    for seqs in marks:
        status.mark(seqs)
    assert status.done == ranges


def test_has_is_true_exactly_inside_the_half_open_ranges() -> None:
    status = record(done=[[2, 4], [7, 8]])
    assert [seq for seq in range(10) if status.has(seq)] == [2, 3, 7]
    assert not record().has(0)


def test_a_record_survives_the_bucket_round_trip() -> None:
    status = record(processed=3, failed=1, chunks=4, errors=[["b", "bad"]], done=[[0, 3]])
    again = JobRecord(**json.loads(status.dump()))
    assert again == status
    public = again.public()
    assert public.state is JobState.QUEUED and public.errors == (("b", "bad"),)
    assert (public.total, public.processed, public.failed, public.chunks) == (10, 3, 1, 4)


@pytest.mark.parametrize("state", ["QUEUED", "RUNNING", "SUCCEEDED", "FAILED"])
def test_every_stored_state_maps_to_a_job_state(state: str) -> None:
    public = JobRecord(JOB, "default", state, 1).public()
    assert public.state == state
    assert public.done is (state in ("SUCCEEDED", "FAILED"))


def test_an_unknown_stored_state_is_refused() -> None:
    with pytest.raises(ValueError):
        JobRecord(JOB, "default", "PAUSED", 1).public()


def test_a_job_message_names_its_job_and_position() -> None:
    raw = json.loads(job_message(JOB, "ns", 7, Document("d", "text", {"k": 1})))
    assert (raw["job"], raw["namespace"], raw["seq"]) == (JOB, "ns", 7)
    assert raw["doc"]["id"] == "d"


# -- the status bucket, compare-and-set --------------------------------------


@dataclass
class Entry:
    value: bytes
    revision: int


class FakeBucket:
    """A key-value bucket as nats-py's KeyValue behaves for get/put/update;
    before_update runs just before an update is checked (another worker)."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.revision = 0
        self.updates = 0
        self.conflicts = 0
        self.before_update: Callable[[], Awaitable[None]] | None = None

    async def get(self, key: str) -> Entry:
        if key not in self.entries:
            raise nats.js.errors.KeyNotFoundError()
        return self.entries[key]

    async def put(self, key: str, value: bytes) -> int:
        self.revision += 1
        self.entries[key] = Entry(value, self.revision)
        return self.revision

    async def update(self, key: str, value: bytes, last: int) -> int:
        hook, self.before_update = self.before_update, None
        if hook is not None:
            await hook()
        if self.entries[key].revision != last:
            self.conflicts += 1
            raise nats.js.errors.KeyWrongLastSequenceError()
        self.updates += 1
        return await self.put(key, value)


def statuses_with(status: JobRecord) -> tuple[JobStatuses, FakeBucket]:
    bucket = FakeBucket()
    statuses = JobStatuses()
    statuses.kv = bucket
    asyncio.run(statuses.put(status))
    return statuses, bucket


def load(statuses: JobStatuses) -> JobRecord:
    return asyncio.run(statuses.load(JOB))[0]


def test_a_batch_is_counted_once_however_often_it_comes() -> None:
    statuses, bucket = statuses_with(record(total=4))
    asyncio.run(statuses.count(JOB, [0, 1], 2, [("b", "bad")]))
    asyncio.run(statuses.count(JOB, [0, 1], 2, [("b", "bad")]))  # redelivered
    status = load(statuses)
    assert (status.processed, status.failed, status.chunks) == (2, 1, 2)
    assert status.errors == [["b", "bad"]]
    assert status.state == "RUNNING" and status.done == [[0, 2]]
    assert bucket.updates == 1  # the second count changed nothing


def test_a_partly_counted_batch_counts_only_its_new_positions() -> None:
    statuses, _ = statuses_with(record(total=4))
    asyncio.run(statuses.count(JOB, [0, 1], 2, []))
    asyncio.run(statuses.count(JOB, [1, 2], 2, []))
    assert load(statuses).processed == 3


def test_the_job_succeeds_when_the_last_position_is_counted() -> None:
    statuses, _ = statuses_with(record(total=3))
    asyncio.run(statuses.count(JOB, [2], 1, []))
    asyncio.run(statuses.count(JOB, [0], 1, []))
    assert load(statuses).state == "RUNNING"
    asyncio.run(statuses.count(JOB, [1], 1, [("x", "failed")]))
    final = load(statuses)
    assert final.state == "SUCCEEDED"  # failed documents do not fail the job
    assert (final.processed, final.failed, final.done) == (3, 1, [[0, 3]])


def test_an_update_that_lost_the_race_is_retried_on_the_new_value() -> None:
    statuses, bucket = statuses_with(record(total=4))

    async def another_worker() -> None:
        # Counts [2, 3] between this worker's read and its update.
        current = JobRecord(**json.loads(bucket.entries[JOB].value))
        current.mark([2, 3])
        current.processed += 2
        await bucket.put(JOB, current.dump())

    bucket.before_update = another_worker
    asyncio.run(statuses.count(JOB, [0, 1], 2, []))
    status = load(statuses)
    assert bucket.conflicts == 1
    assert status.processed == 4 and status.state == "SUCCEEDED"
    assert status.done == [[0, 4]]


def test_errors_kept_are_bounded_but_counted_exactly() -> None:
    statuses, _ = statuses_with(record(total=2 * MAX_ERRORS))
    failures = [(f"d{i}", "bad") for i in range(MAX_ERRORS - 1)]
    asyncio.run(statuses.count(JOB, list(range(MAX_ERRORS - 1)), 0, failures))
    asyncio.run(statuses.count(JOB, [MAX_ERRORS, MAX_ERRORS + 1], 0, [("a", "x"), ("b", "y")]))
    status = load(statuses)
    assert status.failed == MAX_ERRORS + 1
    assert len(status.errors) == MAX_ERRORS
    assert status.errors[-1] == ["a", "x"]


def test_set_running_moves_only_a_queued_job() -> None:
    statuses, bucket = statuses_with(record())
    asyncio.run(statuses.set_running(JOB))
    assert load(statuses).state == "RUNNING"
    asyncio.run(statuses.set_running(JOB))
    assert bucket.updates == 1
    failed, bucket = statuses_with(JobRecord(JOB, "default", "FAILED", 1))
    asyncio.run(failed.set_running(JOB))
    assert load(failed).state == "FAILED" and bucket.updates == 0


def test_an_unknown_job_is_not_found() -> None:
    statuses, _ = statuses_with(record())
    with pytest.raises(NotFound, match="does not exist"):
        asyncio.run(statuses.load("f" * 32))


# -- NATS failures as our errors ---------------------------------------------


@pytest.mark.parametrize(
    ("exc", "unreachable"),
    [
        (nats.errors.TimeoutError(), True),
        (nats.errors.NoRespondersError(), True),
        (nats.errors.ConnectionClosedError(), True),
        (nats.js.errors.NoStreamResponseError(), True),
        (nats.js.errors.ServiceUnavailableError(), True),
        (TimeoutError(), True),
        (ConnectionRefusedError(), True),
        (nats.js.errors.KeyWrongLastSequenceError(), False),
        (nats.js.errors.NotFoundError(), False),
        (nats.js.errors.BadRequestError(), False),
        (nats.errors.MaxPayloadError(), False),
    ],
)
def test_nats_errors_sort_into_unreachable_or_not(exc: Exception, unreachable: bool) -> None:
    assert isinstance(exc, NATS_ERRORS)  # every one of them is a NATS failure
    assert isinstance(exc, NATS_UNREACHABLE) is unreachable


def test_errors_of_our_own_are_no_nats_failure() -> None:
    assert not isinstance(ValueError("bad json"), NATS_ERRORS)
    assert not isinstance(NotFound("x"), NATS_ERRORS)


class FakeJetStream:
    def __init__(self, messages: int = 0, fail_after: int | None = None) -> None:
        self.messages = messages
        self.fail_after = fail_after
        self.published: list[tuple[str, bytes, dict[str, str]]] = []

    async def stream_info(self, name: str) -> Any:
        return SimpleNamespace(state=SimpleNamespace(messages=self.messages))

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        if self.fail_after is not None and len(self.published) >= self.fail_after:
            raise nats.errors.TimeoutError()
        self.published.append((subject, payload, headers))


def with_ingestion(
    tmp_path: Path,
    body: Callable[[NatsIngestion], Awaitable[T]],
    *,
    connected: bool = True,
    js: FakeJetStream | None = None,
    **config: Any,
) -> T:
    """body(ingestion) for a NatsIngestion wired to fakes (no server)."""

    async def main() -> T:
        settings = IngestionConfig(
            queue="nats", nats_url="nats://user:s3cret@127.0.0.1:4222", **config
        )
        ingestion = NatsIngestion(
            settings, open_retriever(tmp_path / "data"), None, LimitsConfig(), worker=False
        )
        ingestion.js = js or FakeJetStream()
        ingestion.nc = SimpleNamespace(is_closed=False, is_connected=True)
        ingestion.statuses.kv = FakeBucket()
        if connected:
            ingestion.connected.set()
        return await body(ingestion)

    return asyncio.run(main())


def test_a_nats_failure_is_unavailable_without_credentials(tmp_path: Path) -> None:
    async def body(ingestion: NatsIngestion) -> None:
        async def times_out() -> None:
            raise nats.errors.TimeoutError()

        with pytest.raises(Unavailable) as caught:
            await ingestion._nats("reading the job", times_out())
        assert "reading the job failed" in str(caught.value)
        assert "s3cret" not in str(caught.value)

        async def not_found() -> None:
            raise NotFound("job x does not exist")

        with pytest.raises(NotFound):  # our own errors pass as they are
            await ingestion._nats("reading the job", not_found())

        async def a_bug() -> None:
            raise KeyError("x")

        with pytest.raises(KeyError):  # neither NATS nor ours: not hidden as Unavailable
            await ingestion._nats("reading the job", a_bug())

    with_ingestion(tmp_path, body)


def test_before_connecting_reads_are_unavailable_but_ids_checked_first(tmp_path: Path) -> None:
    async def body(ingestion: NatsIngestion) -> None:
        with pytest.raises(InvalidArgument):
            await ingestion.get("not-a-job-id")
        with pytest.raises(Unavailable, match="not connected") as caught:
            await ingestion.get(JOB)
        assert "s3cret" not in str(caught.value)
        with pytest.raises(Unavailable, match="not connected"):
            await ingestion.submit("", [Document("a", "x")])

    with_ingestion(tmp_path, body, connected=False)


def test_a_lost_connection_is_unavailable(tmp_path: Path) -> None:
    async def body(ingestion: NatsIngestion) -> None:
        ingestion.nc = SimpleNamespace(is_closed=False, is_connected=False)
        with pytest.raises(Unavailable, match="unreachable"):
            await ingestion.get(JOB)

    with_ingestion(tmp_path, body)


def test_submit_queues_each_document_under_a_deduplicating_id(tmp_path: Path) -> None:
    js = FakeJetStream()

    async def body(ingestion: NatsIngestion) -> None:
        job_id = await ingestion.submit("ns", [Document("a", "x"), Document("b", "y")])
        assert [h["Nats-Msg-Id"] for _, _, h in js.published] == [f"{job_id}:0", f"{job_id}:1"]
        assert {subject for subject, _, _ in js.published} == {"rag.jobs"}
        status = await ingestion.get(job_id)
        assert (status.state, status.namespace, status.total) == (JobState.QUEUED, "ns", 2)
        with pytest.raises(NotFound):
            await ingestion.get("f" * 32)

    with_ingestion(tmp_path, body, js=js)


@pytest.mark.parametrize(("waiting", "refused"), [(7, False), (8, True)])
def test_submit_is_refused_past_the_pending_documents_limit(
    tmp_path: Path, waiting: int, refused: bool
) -> None:
    # The limit is 10 documents waiting: 7 + 3 fit exactly, 8 + 3 do not.
    js = FakeJetStream(messages=waiting)

    async def body(ingestion: NatsIngestion) -> None:
        docs = [Document(f"d{i}", "x") for i in range(3)]
        if refused:
            with pytest.raises(ResourceExhausted, match=f"{waiting} documents are waiting"):
                await ingestion.submit("", docs)
            assert js.published == []
        else:
            await ingestion.submit("", docs)
            assert len(js.published) == 3

    with_ingestion(tmp_path, body, js=js, max_pending_documents=10)


def test_a_job_not_fully_queued_is_failed_and_unavailable(tmp_path: Path) -> None:
    js = FakeJetStream(fail_after=1)

    async def body(ingestion: NatsIngestion) -> None:
        with pytest.raises(Unavailable, match="submit again"):
            await ingestion.submit("", [Document("a", "x"), Document("b", "y")])
        bucket = ingestion.statuses.kv
        (stored,) = [JobRecord(**json.loads(e.value)) for e in bucket.entries.values()]
        assert stored.state == "FAILED"
        assert "not fully queued" in stored.errors[0][1]

    with_ingestion(tmp_path, body, js=js)
