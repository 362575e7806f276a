"""Per-tenant usage: what is counted survives a restart, nothing is lost to
threads or flushes, days roll over at UTC midnight, costs add up."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rag_grpc.errors import InvalidArgument
from rag_grpc.security.model import Prices, TenantUsage
from rag_grpc.security.usage import UsageLedger, estimated_cost


class Clock:
    """Wall-clock time the test moves by hand."""

    def __init__(self, at: datetime) -> None:
        self.now = at.timestamp()

    def __call__(self) -> float:
        return self.now


def test_counts_survive_reopen_and_match_the_calls(tmp_path: Path) -> None:
    ledger = UsageLedger(tmp_path / "usage.db")
    for _ in range(3):
        ledger.add("acme", embedding_tokens=100, searches=1)
    ledger.add("acme", prompt_tokens=40, completion_tokens=25, asks=1)
    ledger.add("globex", searches=2)
    ledger.set_gauges("acme", documents=10, vectors=30, stored_bytes=4096)
    ledger.close()

    reopened = UsageLedger(tmp_path / "usage.db")
    assert reopened.totals() == {
        "acme": TenantUsage(
            embedding_tokens=300,
            prompt_tokens=40,
            completion_tokens=25,
            searches=3,
            asks=1,
            documents=10,
            vectors=30,
            stored_bytes=4096,
        ),
        "globex": TenantUsage(searches=2),
    }
    assert reopened.totals("acme")["acme"].searches == 3
    assert reopened.totals("initech") == {"initech": TenantUsage()}
    reopened.close()


def test_gauges_are_set_not_added(tmp_path: Path) -> None:
    ledger = UsageLedger(tmp_path / "usage.db")
    ledger.set_gauges("acme", documents=10, vectors=30, stored_bytes=4096)
    ledger.flush()
    ledger.set_gauges("acme", documents=7)  # the others keep their values
    assert ledger.totals("acme")["acme"] == TenantUsage(documents=7, vectors=30, stored_bytes=4096)
    ledger.close()
    reopened = UsageLedger(tmp_path / "usage.db")
    usage = reopened.totals("acme")["acme"]
    assert (usage.documents, usage.vectors, usage.stored_bytes) == (7, 30, 4096)
    reopened.close()


def test_concurrent_adds_lose_nothing(tmp_path: Path) -> None:
    # Flushes every few milliseconds, so they interleave with the adds and
    # the reads; a read must never count a batch twice or miss it.
    ledger = UsageLedger(tmp_path / "usage.db", flush_interval_s=0.002)
    threads_count, adds = 8, 2000
    done = threading.Event()
    seen: list[int] = []

    def reader() -> None:
        while not done.is_set():
            seen.append(ledger.totals("acme")["acme"].searches)

    def writer() -> None:
        for _ in range(adds):
            ledger.add("acme", searches=1, embedding_tokens=3)

    watcher = threading.Thread(target=reader)
    watcher.start()
    writers = [threading.Thread(target=writer) for _ in range(threads_count)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    watcher.join()

    total = threads_count * adds
    assert seen == sorted(seen) and seen[-1] <= total
    ledger.close()
    reopened = UsageLedger(tmp_path / "usage.db")
    usage = reopened.totals("acme")["acme"]
    assert (usage.searches, usage.embedding_tokens) == (total, 3 * total)
    reopened.close()


def test_waiting_counts_are_written_within_the_interval(tmp_path: Path) -> None:
    ledger = UsageLedger(tmp_path / "usage.db", flush_interval_s=0.05)
    other = UsageLedger(tmp_path / "usage.db")  # a second process would see the file alone
    ledger.add("acme", asks=4)
    deadline = time.monotonic() + 10
    while other.totals("acme")["acme"].asks != 4:
        assert time.monotonic() < deadline, "the background flush never wrote the counts"
        time.sleep(0.01)
    ledger.close()
    other.close()


def test_day_buckets_roll_over_at_utc_midnight(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 5, 1, 23, 59, 59, 500_000, tzinfo=UTC))
    ledger = UsageLedger(tmp_path / "usage.db", clock=clock)
    ledger.add("acme", completion_tokens=10)
    ledger.flush()
    ledger.add("acme", completion_tokens=1)  # still 1 May, written after midnight
    assert ledger.generated_tokens_today("acme") == 11

    clock.now = datetime(2026, 5, 2, 0, 0, tzinfo=UTC).timestamp()
    assert ledger.generated_tokens_today("acme") == 0
    ledger.add("acme", completion_tokens=5)
    assert ledger.generated_tokens_today("acme") == 5
    assert ledger.usage_today("acme").completion_tokens == 5
    ledger.close()

    reopened = UsageLedger(tmp_path / "usage.db", clock=clock)
    assert reopened.generated_tokens_today("acme") == 5
    assert reopened.totals("acme")["acme"].completion_tokens == 16
    days = sqlite3.connect(tmp_path / "usage.db").execute(
        "SELECT day, completion_tokens FROM usage_days ORDER BY day"
    )
    assert days.fetchall() == [("2026-05-01", 11), ("2026-05-02", 5)]
    reopened.close()


def test_estimated_cost_adds_up_each_priced_unit() -> None:
    prices = Prices(
        embedding_tokens=0.00000002,
        prompt_tokens=0.0000005,
        completion_tokens=0.0000015,
        searches=0.00001,
        asks=0.0001,
        stored_bytes_per_day=0.0000000001,
    )
    usage = TenantUsage(
        embedding_tokens=1_000_000,  # 0.02
        prompt_tokens=200_000,  # 0.10
        completion_tokens=100_000,  # 0.15
        searches=3_000,  # 0.03
        asks=500,  # 0.05
        documents=9,
        vectors=99,
        stored_bytes=2_000_000_000,  # 0.20 a day
    )
    assert estimated_cost(usage, prices, days_stored=0) == pytest.approx(0.35)
    assert estimated_cost(usage, prices, days_stored=2.5) == pytest.approx(0.35 + 0.5)
    assert estimated_cost(usage, Prices(), days_stored=30) == 0.0


def test_cost_today_counts_today_and_storage_so_far(tmp_path: Path) -> None:
    prices = Prices(asks=0.01, stored_bytes_per_day=0.000001)
    clock = Clock(datetime(2026, 5, 1, 20, 0, tzinfo=UTC))
    ledger = UsageLedger(tmp_path / "usage.db", clock=clock)
    ledger.add("acme", asks=100)  # yesterday, as seen from the 2nd
    ledger.set_gauges("acme", stored_bytes=1_000_000)  # $1 a day
    clock.now = datetime(2026, 5, 2, 6, 0, tzinfo=UTC).timestamp()
    ledger.add("acme", asks=3)
    assert ledger.cost_today("acme", prices) == pytest.approx(0.03 + 0.25)
    ledger.close()


@pytest.mark.parametrize("name", ["", "Acme", "-acme", "acme corp", "a" * 64, "acme\n", "ns~x"])
def test_bad_tenant_names_are_refused(tmp_path: Path, name: str) -> None:
    ledger = UsageLedger(tmp_path / "usage.db")
    for call in (
        lambda: ledger.add(name, searches=1),
        lambda: ledger.set_gauges(name, documents=1),
        lambda: ledger.totals(name),
        lambda: ledger.generated_tokens_today(name),
        lambda: ledger.cost_today(name, Prices()),
    ):
        with pytest.raises(InvalidArgument, match="tenant name"):
            call()
    assert ledger.totals() == {}
    ledger.add("a" * 63, searches=1)  # the longest name allowed
    ledger.close()


def test_bad_counts_are_refused(tmp_path: Path) -> None:
    ledger = UsageLedger(tmp_path / "usage.db")
    with pytest.raises(InvalidArgument, match="searches must be"):
        ledger.add("acme", searches=-1)
    with pytest.raises(InvalidArgument, match="documents must be"):
        ledger.set_gauges("acme", documents=1.5)  # type: ignore[arg-type]
    assert ledger.totals() == {}
    ledger.close()


def test_a_failed_flush_keeps_the_counts_for_the_next(tmp_path: Path) -> None:
    ledger = UsageLedger(tmp_path / "usage.db", flush_interval_s=3600)
    ledger.add("acme", searches=2)
    ledger.set_gauges("acme", documents=5)
    # Another writer holds the file: the flush fails as it would on a busy
    # (or full) database. A short timeout keeps the test quick.
    ledger._conn.execute("PRAGMA busy_timeout=50")
    blocker = sqlite3.connect(tmp_path / "usage.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        ledger.flush()
    ledger.add("acme", searches=1)
    ledger.set_gauges("acme", documents=6)  # newer than the failed batch
    assert ledger.totals("acme")["acme"] == TenantUsage(searches=3, documents=6)
    blocker.execute("ROLLBACK")
    blocker.close()
    ledger.close()
    reopened = UsageLedger(tmp_path / "usage.db")
    assert reopened.totals("acme")["acme"] == TenantUsage(searches=3, documents=6)
    reopened.close()
