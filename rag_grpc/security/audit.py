"""An append-only, hash-chained audit log of security-relevant actions, in its
own SQLite file.

Each row is stored as canonical JSON (sorted keys, ASCII) with the hash of
the row before it and its own hash, ``sha256(prev_hash || row)``; a meta row
(the chain head) names the last sequence number and hash. Triggers refuse
UPDATE and DELETE, so the application cannot change history by mistake; an
attacker holding the file can drop them, and `AuditLog.verify` then finds the
row that was changed, removed, reordered or cut off the tail. An attacker who
rewrites every row after the change *and* the head is only caught against a
head saved elsewhere (`AuditLog.head`, passed back to `verify` as anchor).

Rows never hold document content: an event has no field for it, its ids are
capped and its detail is short.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rag_grpc.store.database import connect, immediate_transaction, private_file

# An event names at most this many ids (a Delete of 10,000 ids records the
# first 100 and the total), each cut to this many characters; its detail
# is cut likewise. Enough to investigate, too little to smuggle content.
MAX_AUDIT_IDS = 100
MAX_ID_CHARS = 256
MAX_DETAIL_CHARS = 512

# The prev_hash of row 1.
GENESIS_HASH = "0" * 64

_OUTCOME = re.compile(r"ok|denied|error: \S.*", re.DOTALL)

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_events (
    seq INTEGER PRIMARY KEY,
    -- Copied from the row's JSON (verify checks it) for export by time.
    at TEXT NOT NULL,
    row TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_by_at ON audit_events (at);
-- The chain head: the last row's sequence and hash, so that a log cut
-- short at its tail no longer matches it.
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: rows cannot be changed'); END;
CREATE TRIGGER IF NOT EXISTS audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: rows cannot be deleted'); END;
CREATE TRIGGER IF NOT EXISTS audit_head_forward_only BEFORE UPDATE ON audit_head
WHEN NEW.seq <> OLD.seq + 1
BEGIN SELECT RAISE(ABORT, 'the audit head only moves to the next row'); END;
CREATE TRIGGER IF NOT EXISTS audit_head_kept BEFORE DELETE ON audit_head
BEGIN SELECT RAISE(ABORT, 'the audit head cannot be deleted'); END;
"""


@dataclass(frozen=True)
class AuditEvent:
    """One action to record: who did it (principal, tenant), what (action,
    namespace, ids, a short detail) and how it ended (outcome: "ok",
    "denied" or "error: <status>"). at is set by the log when recorded."""

    principal: str
    tenant: str | None
    action: str
    outcome: str
    namespace: str | None = None
    ids: tuple[str, ...] = ()
    detail: str = ""
    at: datetime | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # A list given for ids would make the frozen event mutable.
        object.__setattr__(self, "ids", tuple(self.ids))
        if not self.principal or not self.action:
            raise ValueError("an audit event needs a principal and an action")
        if not _OUTCOME.fullmatch(self.outcome):
            raise ValueError(
                f'outcome must be "ok", "denied" or "error: <status>", got {self.outcome!r}'
            )


@dataclass(frozen=True)
class ChainHead:
    """The last row's sequence number and hash; saved outside the file, it
    lets `AuditLog.verify` catch a rewrite of everything after it."""

    seq: int
    hash: str


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of checking the chain: ok, how many rows checked out
    before the first problem, and that problem's sequence number and reason."""

    ok: bool
    checked: int
    first_bad: int | None = None
    reason: str | None = None


class AuditLog:
    """The audit log in one SQLite file (WAL, a durable commit per record).

    Thread-safe: records go through one connection under a lock, and the
    next sequence number is read inside the write transaction, so processes
    sharing the file also append without gaps.
    """

    def __init__(self, path: Path, *, clock: Callable[[], datetime] | None = None) -> None:
        self.path = path
        self._clock = clock or (lambda: datetime.now(UTC))
        private_file(path)
        self._lock = threading.Lock()
        self._writer = connect(path)
        self._writer.executescript(SCHEMA)

    def close(self) -> None:
        """Close the writer connection."""
        with self._lock:
            self._writer.close()

    def record(self, event: AuditEvent) -> int:
        """Append the event, stamped with the current UTC time; return its
        sequence number once it is durably committed."""
        with self._lock:
            conn = self._writer
            with immediate_transaction(conn):
                head = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
                # Continue from the head, not from the last row, so rows cut
                # off the tail stay missing rather than being written over.
                seq, prev_hash = (int(head[0]) + 1, str(head[1])) if head else (1, GENESIS_HASH)
                # Stamped inside the lock: times follow sequence order
                # (unless the wall clock steps back).
                at = _format_at(self._clock())
                row = _canonical(seq, at, event)
                digest = chain_hash(prev_hash, row)
                conn.execute(
                    "INSERT INTO audit_events (seq, at, row, prev_hash, hash) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (seq, at, row, prev_hash, digest),
                )
                conn.execute(
                    "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                    (seq, digest),
                )
        return seq

    def head(self) -> ChainHead | None:
        """The chain head as recorded (None for an empty log): keep it
        somewhere else to verify against later."""
        conn = connect(self.path)
        try:
            row = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        finally:
            conn.close()
        return ChainHead(int(row[0]), str(row[1])) if row else None

    def verify(self, anchor: ChainHead | None = None) -> VerifyResult:
        """Check every row's hash and link, that sequence numbers run 1, 2, 3…
        without gaps, that the head names the last row and, given an anchor
        saved earlier, that its row is still there unchanged."""
        conn = connect(self.path)
        try:
            # One read transaction: rows and head from the same snapshot,
            # whatever is appended meanwhile.
            conn.execute("BEGIN")
            head = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            rows = conn.execute(
                "SELECT seq, at, row, prev_hash, hash FROM audit_events ORDER BY seq"
            )
            return _verify_rows(rows, head, anchor)
        finally:
            conn.close()

    def export(
        self, since: datetime | None = None, *, after_seq: int = 0, limit: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Events in sequence order (those at or after since, when given; after
        sequence number after_seq; at most limit of them), as JSON-ready
        dicts: the recorded fields plus seq, at, prev_hash and hash."""
        conn = connect(self.path)
        try:
            conn.execute("BEGIN")
            clauses: list[str] = ["seq > ?"]
            args: list[object] = [after_seq]
            if since is not None:
                clauses.append("at >= ?")
                args.append(_format_at(since))
            rows = conn.execute(
                "SELECT row, prev_hash, hash FROM audit_events "
                f"WHERE {' AND '.join(clauses)} ORDER BY seq LIMIT ?",
                (*args, -1 if limit is None else limit),
            )
            for row, prev_hash, digest in rows:
                yield {**json.loads(row), "prev_hash": prev_hash, "hash": digest}
        finally:
            conn.close()


def chain_hash(prev_hash: str, row: str) -> str:
    """A row's hash: sha256 over the previous row's hash (hex) and the row's
    canonical JSON, both ASCII."""
    return hashlib.sha256(prev_hash.encode("ascii") + row.encode("ascii")).hexdigest()


def _verify_rows(
    rows: Iterator[tuple[int, str, str, str, str]],
    head: tuple[int, str] | None,
    anchor: ChainHead | None,
) -> VerifyResult:
    checked = 0
    last_seq, last_hash = 0, GENESIS_HASH
    anchor_seen = False

    def bad(seq: int, reason: str) -> VerifyResult:
        return VerifyResult(False, checked, seq, reason)

    for seq, at, row, prev_hash, digest in rows:
        if seq > last_seq + 1:
            return bad(last_seq + 1, _missing(last_seq + 1, seq - 1))
        try:
            fields = json.loads(row)
            written_seq, written_at = fields["seq"], fields["at"]
        except (ValueError, TypeError, KeyError):
            return bad(seq, f"row {seq} was modified (its record is not readable)")
        if written_seq != seq:
            return bad(
                seq,
                f"rows out of order: the row at sequence {seq} was written as row {written_seq}",
            )
        if chain_hash(prev_hash, row) != digest or written_at != at:
            return bad(seq, f"row {seq} was modified")
        if prev_hash != last_hash:
            if seq == 1:
                return bad(1, "row 1 was modified (it does not start the chain)")
            # This row is intact, so its record of the one before is the truth.
            return bad(
                last_seq,
                f"row {last_seq} was modified (row {seq} records a different hash for it)",
            )
        if anchor is not None and seq == anchor.seq:
            if digest != anchor.hash:
                return bad(seq, f"row {seq} was modified (it differs from the saved anchor)")
            anchor_seen = True
        checked += 1
        last_seq, last_hash = seq, digest

    if head is None:
        if last_seq:
            return bad(last_seq, "the chain head is missing (its meta row was removed)")
    else:
        head_seq, head_hash = int(head[0]), str(head[1])
        if head_seq > last_seq:
            return bad(last_seq + 1, _missing(last_seq + 1, head_seq) + " (the log was truncated)")
        if head_seq < last_seq:
            return bad(
                head_seq + 1,
                f"row {head_seq + 1} was added outside the log (the head names row {head_seq})",
            )
        if head_hash != last_hash:
            return bad(
                last_seq, f"row {last_seq} was modified (the head records a different hash for it)"
            )
    if anchor is not None and not anchor_seen:
        return bad(last_seq + 1, _missing(last_seq + 1, anchor.seq) + " (behind the saved anchor)")
    return VerifyResult(True, checked)


def _missing(first: int, last: int) -> str:
    return f"row {first} is missing" if first == last else f"rows {first} to {last} are missing"


def _format_at(at: datetime) -> str:
    """Fixed-width UTC ISO 8601, so text order is time order."""
    if at.tzinfo is None:
        raise ValueError("audit times must be timezone-aware")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical(seq: int, at: str, event: AuditEvent) -> str:
    """The row as hashed: sorted keys, no spaces, ASCII only (so ids with
    any characters, even lone surrogates, serialise one way)."""
    row = {
        **{
            f.name: getattr(event, f.name)
            for f in dataclasses.fields(event)
            if f.name not in ("at", "ids", "detail")
        },
        "seq": seq,
        "at": at,
        "ids": [_cut(i, MAX_ID_CHARS) for i in event.ids[:MAX_AUDIT_IDS]],
        "ids_total": len(event.ids),
        "detail": _cut(event.detail, MAX_DETAIL_CHARS),
    }
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
