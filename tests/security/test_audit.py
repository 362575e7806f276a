"""The audit log: a chain that verifies, and every way of tampering with the
file that an attacker could try is named by verify."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from rag_grpc.security.audit import (
    MAX_AUDIT_IDS,
    MAX_DETAIL_CHARS,
    MAX_ID_CHARS,
    AuditEvent,
    AuditLog,
    chain_hash,
)


def event(n: int = 0, **changes: object) -> AuditEvent:
    base = AuditEvent(
        principal="spiffe://example.org/acme/app",
        tenant="acme",
        action="Delete",
        outcome="ok",
        namespace="docs",
        ids=(f"doc-{n}",),
        detail=f"event {n}",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    audit = AuditLog(tmp_path / "audit.db")
    yield audit
    audit.close()


def fill(log: AuditLog, count: int) -> None:
    for n in range(count):
        log.record(event(n))


def attack(path: Path, *statements: str) -> None:
    """Change the file as someone holding it would: drop the triggers first."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for trigger in ("audit_events_no_update", "audit_events_no_delete"):
            conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()


def test_chain_verifies_after_records_from_many_threads(log: AuditLog) -> None:
    seqs: list[int] = []
    lock = threading.Lock()

    def writer(worker: int) -> None:
        for n in range(40):
            seq = log.record(event(n, principal=f"apikey:worker-{worker}"))
            with lock:
                seqs.append(seq)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(seqs) == list(range(1, 241))
    result = log.verify()
    assert result.ok and result.checked == 240 and result.first_bad is None
    head = log.head()
    assert head is not None and head.seq == 240


def test_appending_continues_after_reopen(tmp_path: Path) -> None:
    first = AuditLog(tmp_path / "audit.db")
    fill(first, 3)
    first.close()
    again = AuditLog(tmp_path / "audit.db")
    assert again.record(event(3)) == 4
    assert again.verify().ok
    again.close()


def test_empty_log_verifies(log: AuditLog) -> None:
    assert log.verify().ok and log.verify().checked == 0
    assert log.head() is None


def test_the_application_cannot_change_or_delete_rows(log: AuditLog) -> None:
    fill(log, 3)
    conn = sqlite3.connect(log.path, isolation_level=None)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE audit_events SET row = 'x' WHERE seq = 2")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM audit_events WHERE seq = 3")
        with pytest.raises(sqlite3.DatabaseError, match="head"):
            conn.execute("UPDATE audit_head SET seq = 1")
    finally:
        conn.close()
    assert log.verify().ok


def test_an_edited_row_is_named(log: AuditLog) -> None:
    fill(log, 30)
    attack(
        log.path,
        "UPDATE audit_events SET row = replace(row, 'event 16', 'nothing') WHERE seq = 17",
    )
    result = log.verify()
    assert not result.ok
    assert (result.first_bad, result.reason) == (17, "row 17 was modified")
    assert result.checked == 16


def test_an_edited_row_with_its_hash_recomputed_is_named(log: AuditLog) -> None:
    fill(log, 30)
    conn = sqlite3.connect(log.path)
    row, prev_hash = conn.execute(
        "SELECT row, prev_hash FROM audit_events WHERE seq = 17"
    ).fetchone()
    conn.close()
    forged = row.replace('"outcome":"ok"', '"outcome":"denied"')
    forged_hash = chain_hash(prev_hash, forged)
    attack(
        log.path,
        f"UPDATE audit_events SET row = '{forged}', hash = '{forged_hash}' WHERE seq = 17",
    )
    result = log.verify()
    assert (result.ok, result.first_bad) == (False, 17)
    assert result.reason is not None and result.reason.startswith("row 17 was modified")


def test_a_deleted_middle_row_is_named(log: AuditLog) -> None:
    fill(log, 30)
    attack(log.path, "DELETE FROM audit_events WHERE seq = 18")
    result = log.verify()
    assert (result.ok, result.first_bad, result.reason) == (False, 18, "row 18 is missing")


def test_a_cut_tail_is_detected_through_the_head(log: AuditLog) -> None:
    fill(log, 30)
    attack(log.path, "DELETE FROM audit_events WHERE seq > 27")
    result = log.verify()
    assert (result.ok, result.first_bad, result.checked) == (False, 28, 27)
    assert result.reason == "rows 28 to 30 are missing (the log was truncated)"


def test_the_last_row_deleted_is_detected(log: AuditLog) -> None:
    fill(log, 5)
    attack(log.path, "DELETE FROM audit_events WHERE seq = 5")
    result = log.verify()
    assert (result.first_bad, result.reason) == (5, "row 5 is missing (the log was truncated)")


def test_a_deleted_head_is_detected(log: AuditLog) -> None:
    fill(log, 5)
    attack(log.path, "DROP TRIGGER audit_head_kept", "DELETE FROM audit_head")
    result = log.verify()
    assert not result.ok and result.reason is not None and "head is missing" in result.reason


def test_swapped_sequence_numbers_are_out_of_order(log: AuditLog) -> None:
    fill(log, 10)
    attack(
        log.path,
        "UPDATE audit_events SET seq = -1 WHERE seq = 5",
        "UPDATE audit_events SET seq = 5 WHERE seq = 6",
        "UPDATE audit_events SET seq = 6 WHERE seq = -1",
    )
    result = log.verify()
    assert (result.ok, result.first_bad) == (False, 5)
    assert result.reason is not None and result.reason.startswith("rows out of order")


def test_a_full_rewrite_is_caught_by_a_saved_anchor(log: AuditLog) -> None:
    """Rows cut and the head rewritten to match: only a head kept elsewhere
    can tell."""
    fill(log, 10)
    anchor = log.head()
    assert anchor is not None
    conn = sqlite3.connect(log.path)
    hash_8 = conn.execute("SELECT hash FROM audit_events WHERE seq = 8").fetchone()[0]
    conn.close()
    attack(
        log.path,
        "DELETE FROM audit_events WHERE seq > 8",
        "DROP TRIGGER audit_head_forward_only",
        f"UPDATE audit_head SET seq = 8, hash = '{hash_8}'",
    )
    assert log.verify().ok
    result = log.verify(anchor)
    assert (result.ok, result.first_bad) == (False, 9)
    assert result.reason == "rows 9 to 10 are missing (behind the saved anchor)"


def test_export_since_a_time_is_json_ready(tmp_path: Path) -> None:
    start = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    now = [start]
    log = AuditLog(tmp_path / "audit.db", clock=lambda: now[0])
    for hour in range(4):
        now[0] = start + timedelta(hours=hour)
        log.record(event(hour))

    rows = list(log.export(since=start + timedelta(hours=2)))
    assert [r["seq"] for r in rows] == [3, 4]
    assert rows[0]["at"] == "2026-03-01T14:00:00.000000Z"
    assert rows[0]["detail"] == "event 2" and rows[0]["ids"] == ["doc-2"]
    assert len(rows[0]["hash"]) == 64 and rows[1]["prev_hash"] == rows[0]["hash"]
    json.dumps(rows)  # JSON-ready as it comes
    assert len(list(log.export())) == 4
    # A time in another zone means the same instant.
    plus_two = datetime(2026, 3, 1, 16, 30, tzinfo=timezone(timedelta(hours=2)))
    assert [r["seq"] for r in log.export(since=plus_two)] == [4]
    log.close()


def test_events_hold_no_content_and_their_ids_are_capped(log: AuditLog) -> None:
    names = {f.name for f in dataclasses.fields(AuditEvent)}
    assert names == {
        "principal",
        "tenant",
        "action",
        "outcome",
        "namespace",
        "ids",
        "detail",
        "at",
    }
    many = tuple(f"id-{n}" for n in range(5000))
    log.record(event(ids=[*many[:-1], "x" * 10_000], detail="d" * 10_000))
    log.record(event(ids=("y" * 10_000,)))
    first, second = log.export()
    assert len(first["ids"]) == MAX_AUDIT_IDS and first["ids_total"] == 5000
    assert first["ids"] == list(many[:MAX_AUDIT_IDS])
    assert len(first["detail"]) == MAX_DETAIL_CHARS
    assert len(second["ids"][0]) == MAX_ID_CHARS
    assert log.verify().ok


def test_outcomes_and_times_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outcome"):
        event(outcome="fine")
    assert event(outcome="error: UNAVAILABLE").outcome == "error: UNAVAILABLE"
    naive = AuditLog(tmp_path / "naive.db", clock=lambda: datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="timezone"):
        naive.record(event())
    assert naive.verify().ok and naive.head() is None  # nothing half-written
    naive.close()
