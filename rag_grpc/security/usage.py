"""Per-tenant usage, kept in SQLite: counters added per UTC day (tokens,
searches, asks) and gauges set to the latest value (documents, vectors,
stored bytes), with the estimated cost they add up to.

Adds are batched in memory and written at most every ``flush_interval_s``:
a durable commit cost 2 to 7 ms here (synchronous=FULL, one upsert per
commit; 13 µs with synchronous=NORMAL, which a power cut can lose anyway),
against 3 µs for an add in memory, and adds happen on every request.
What a crash (of the process or the machine) can lose is the usage of the
last ``flush_interval_s`` (1 s by default; more only while the disk refuses
writes), and only in the tenant's favour: counts are under-reported, never
doubled.

Replicated (``replicated=True``: the NATS write log) the counters travel
through the log instead, so every replica reports the same totals: each
flush seals what was counted here since the last one into a batch with an
id, kept in the ``usage_outbox`` table until it comes back from the log;
the log applier publishes the sealed batches (the id is the entry's
Nats-Msg-Id) and every replica, this one included, adds each entry's counts
with `apply_batch`, in one transaction with the log sequence it applied
(``usage_log_positions``) and the removal of the batch from the outbox. An
entry applied twice (the store's own position is set after this commit, so
a crash between the two replays it) is skipped by that sequence; a crash
loses at most the counts of the last interval, as above.

Why one file of ~500 lines: it is one idea, the ledger. Its adds, flushes,
outbox, log application and reads all share one lock, one schema and one
invariant (a count is in memory, in the outbox or in the totals, never in
two); split apart, each half would need the other's internals.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rag_grpc.errors import InvalidArgument
from rag_grpc.security.model import Prices, TenantUsage
from rag_grpc.security.policy import TENANT_NAME
from rag_grpc.store.database import connect, immediate_transaction, private_file

log = logging.getLogger(__name__)

# Added to, per UTC day.
COUNTERS = ("embedding_tokens", "prompt_tokens", "completion_tokens", "searches", "asks")
# Set to the latest value, per tenant.
GAUGES = ("documents", "vectors", "stored_bytes")
# Bounds of a usage batch on the write log, from whoever wrote it: rows
# (tenant and day) per batch, and each count (2**40 tokens in one flush
# interval is far beyond any real replica, and sums of them stay far from
# SQLite's 2**63).
MAX_BATCH_ROWS = 1000
MAX_BATCH_COUNT = 2**40

# Counters per (tenant, UTC day).
Counts = dict[tuple[str, str], dict[str, int]]

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS usage_days (
    tenant TEXT NOT NULL,
    day TEXT NOT NULL,  -- UTC, YYYY-MM-DD
    {", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in COUNTERS)},
    PRIMARY KEY (tenant, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_gauges (
    tenant TEXT PRIMARY KEY,
    {", ".join(f"{g} INTEGER NOT NULL DEFAULT 0" for g in GAUGES)}
) WITHOUT ROWID;
-- Replicated: batches counted here, sealed, not yet applied from the log.
CREATE TABLE IF NOT EXISTS usage_outbox (
    batch TEXT PRIMARY KEY,
    counts TEXT NOT NULL  -- JSON [[tenant, day, {{counter: n}}], ...]
) WITHOUT ROWID;
-- Replicated: the last log sequence whose usage batch was added here.
CREATE TABLE IF NOT EXISTS usage_log_positions (
    log TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class UsageBatch:
    """Counters one replica added since its previous batch, per tenant and
    UTC day: the payload of a usage entry on the write log."""

    batch_id: str
    counts: Mapping[tuple[str, str], Mapping[str, int]]


def validate_tenant(tenant: object) -> str:
    """The tenant name, if it is one a policy may hold (anything else given:
    InvalidArgument)."""
    if not isinstance(tenant, str) or not TENANT_NAME.fullmatch(tenant):
        raise InvalidArgument(
            f"tenant name {tenant!r} is not valid: 1 to 63 characters of a-z, 0-9, '_' and "
            "'-', starting with a letter or digit"
        )
    return tenant


def estimated_cost(usage: TenantUsage, prices: Prices, days_stored: float) -> float:
    """USD for the usage's counters at these prices, plus its stored bytes
    kept for days_stored days."""
    counted = sum(getattr(usage, c) * getattr(prices, c) for c in COUNTERS)
    return float(counted + usage.stored_bytes * prices.stored_bytes_per_day * days_stored)


class UsageLedger:
    """Durable per-tenant usage in one SQLite file (WAL).

    Thread-safe. Adds and gauge updates wait in memory (under a lock held
    for a few dictionary operations) until a background thread writes them,
    every flush_interval_s, or `flush` / `close` does. Reads see the stored
    rows plus what is waiting, so quotas never lag the flushes.
    """

    def __init__(
        self,
        path: Path,
        *,
        flush_interval_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        replicated: bool = False,
    ) -> None:
        if flush_interval_s <= 0:
            raise ValueError("flush_interval_s must be positive")
        self.path = path
        self.flush_interval_s = flush_interval_s
        self.replicated = replicated
        self._clock = clock
        private_file(path)
        self._conn = connect(path)
        self._conn.executescript(SCHEMA)
        # _pending_lock guards the waiting changes and is all an add takes;
        # _io_lock serialises the connection, so a read never sees a batch
        # both waiting and stored, or neither.
        self._pending_lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._counts: Counts = {}
        self._gauges: dict[str, dict[str, int]] = {}
        # Replicated: sealed batches (as in usage_outbox) until applied from
        # the log, and which of them this process has published.
        self._outbox: dict[str, UsageBatch] = {
            batch_id: UsageBatch(batch_id, _counts_from_json(text))
            for batch_id, text in self._conn.execute("SELECT batch, counts FROM usage_outbox")
        }
        self._published: set[str] = set()
        self._stop = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_every, args=(flush_interval_s,), name="usage-flush", daemon=True
        )
        self._flusher.start()

    # -- writes --------------------------------------------------------------

    def add(
        self,
        tenant: str,
        *,
        embedding_tokens: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        searches: int = 0,
        asks: int = 0,
    ) -> None:
        """Count usage for the tenant on today's UTC day (as of this call)."""
        validate_tenant(tenant)
        given = {
            "embedding_tokens": embedding_tokens,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "searches": searches,
            "asks": asks,
        }
        _check_counts(given)
        key = (tenant, self._day(self._clock()))
        with self._pending_lock:
            waiting = self._counts.setdefault(key, dict.fromkeys(COUNTERS, 0))
            for name, value in given.items():
                waiting[name] += value

    def set_gauges(
        self,
        tenant: str,
        *,
        documents: int | None = None,
        vectors: int | None = None,
        stored_bytes: int | None = None,
    ) -> None:
        """Set the tenant's stored documents, vectors and bytes (those given)."""
        validate_tenant(tenant)
        given = {
            name: value
            for name, value in (
                ("documents", documents),
                ("vectors", vectors),
                ("stored_bytes", stored_bytes),
            )
            if value is not None
        }
        _check_counts(given)
        with self._pending_lock:
            self._gauges.setdefault(tenant, {}).update(given)

    def flush(self) -> None:
        """Write what is waiting in one durable transaction (replicated:
        the counters as a sealed batch in the outbox). On failure it stays
        waiting (and is tried again) and the error is raised."""
        with self._io_lock:
            with self._pending_lock:
                counts, self._counts = self._counts, {}
                gauges, self._gauges = self._gauges, {}
                # Batches sealed by a replicated run, now counted here alone.
                leftover = {} if self.replicated else dict(self._outbox)
            if not counts and not gauges and not leftover:
                return
            sealed = [
                UsageBatch(uuid.uuid4().hex, part)
                for part in (_parts(counts) if self.replicated else ())
            ]
            conn = self._conn
            try:
                with immediate_transaction(conn):
                    if not self.replicated:
                        _add_counts(conn, counts)
                    for batch in leftover.values():
                        _add_counts(conn, batch.counts)
                        conn.execute("DELETE FROM usage_outbox WHERE batch = ?", (batch.batch_id,))
                    conn.executemany(
                        "INSERT INTO usage_outbox (batch, counts) VALUES (?, ?)",
                        [(b.batch_id, _counts_to_json(b.counts)) for b in sealed],
                    )
                    for tenant, values in gauges.items():
                        names = list(values)
                        conn.execute(
                            f"INSERT INTO usage_gauges (tenant, {', '.join(names)}) "
                            f"VALUES (?, {', '.join('?' * len(names))}) ON CONFLICT (tenant) "
                            "DO UPDATE SET " + ", ".join(f"{n} = excluded.{n}" for n in names),
                            (tenant, *values.values()),
                        )
            except BaseException:
                self._restore(counts, gauges)
                raise
            with self._pending_lock:
                for batch in sealed:
                    self._outbox[batch.batch_id] = batch
                for batch_id in leftover:
                    self._outbox.pop(batch_id, None)

    # -- replication -----------------------------------------------------------

    def unpublished(self) -> list[UsageBatch]:
        """Sealed batches this process has not published yet, oldest first
        (after a restart: every batch still in the outbox)."""
        with self._pending_lock:
            return [b for i, b in self._outbox.items() if i not in self._published]

    def published(self, batch_id: str, *, applied_here: bool) -> None:
        """The log has the batch. A process that does not apply the log
        drops it now (the replicas count it); one that does keeps counting
        it until `apply_batch` meets it."""
        with self._pending_lock:
            if batch_id in self._outbox:  # else already applied from the log
                self._published.add(batch_id)
        if not applied_here:
            with self._io_lock:
                self._conn.execute("DELETE FROM usage_outbox WHERE batch = ?", (batch_id,))
                with self._pending_lock:
                    self._outbox.pop(batch_id, None)

    def apply_batch(self, batch: UsageBatch, log_name: str, seq: int) -> bool:
        """Add a usage entry of the log (any replica's, checked) at sequence
        seq, once: the counts, the sequence and the batch's removal from
        this outbox commit together, and an entry at or before the recorded
        sequence changes nothing. Returns whether it was added."""
        with self._io_lock:
            conn = self._conn
            with immediate_transaction(conn):
                row = conn.execute(
                    "SELECT seq FROM usage_log_positions WHERE log = ?", (log_name,)
                ).fetchone()
                fresh = row is None or int(row[0]) < seq
                if fresh:
                    _add_counts(conn, batch.counts)
                    conn.execute(
                        "INSERT INTO usage_log_positions (log, seq) VALUES (?, ?) "
                        "ON CONFLICT (log) DO UPDATE SET seq = excluded.seq",
                        (log_name, seq),
                    )
                conn.execute("DELETE FROM usage_outbox WHERE batch = ?", (batch.batch_id,))
            with self._pending_lock:
                self._outbox.pop(batch.batch_id, None)
                self._published.discard(batch.batch_id)
        return fresh

    def position(self, log_name: str) -> int:
        """The last log sequence whose usage batch was added here (0: none)."""
        with self._io_lock:
            row = self._conn.execute(
                "SELECT seq FROM usage_log_positions WHERE log = ?", (log_name,)
            ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        """Stop the background flushes, write what is waiting, close the file."""
        self._stop.set()
        self._flusher.join()
        self.flush()
        with self._io_lock:
            self._conn.close()

    # -- reads ---------------------------------------------------------------

    def totals(self, tenant: str | None = None) -> dict[str, TenantUsage]:
        """All-time counters and current gauges, by tenant (one tenant,
        zeros if it has no usage yet, or every tenant with any)."""
        if tenant is not None:
            validate_tenant(tenant)
        where, args = ("WHERE tenant = ?", (tenant,)) if tenant is not None else ("", ())
        with self._io_lock:
            counted = self._conn.execute(
                f"SELECT tenant, {', '.join(f'SUM({c})' for c in COUNTERS)} FROM usage_days "
                f"{where} GROUP BY tenant",
                args,
            ).fetchall()
            gauged = self._conn.execute(
                f"SELECT tenant, {', '.join(GAUGES)} FROM usage_gauges {where}", args
            ).fetchall()
            with self._pending_lock:
                waiting = [(t, v) for (t, _), v in self._waiting()]
                waiting_gauges = dict(self._gauges)
        values: dict[str, dict[str, int]] = {}
        if tenant is not None:
            values[tenant] = {}
        for row in counted:
            values.setdefault(row[0], {}).update(zip(COUNTERS, row[1:], strict=True))
        for row in gauged:
            values.setdefault(row[0], {}).update(zip(GAUGES, row[1:], strict=True))
        for name, counts in waiting:
            if tenant is None or name == tenant:
                merged = values.setdefault(name, {})
                for counter, value in counts.items():
                    merged[counter] = merged.get(counter, 0) + value
        for name, gauges in waiting_gauges.items():
            if tenant is None or name == tenant:
                values.setdefault(name, {}).update(gauges)
        return {name: TenantUsage(**values[name]) for name in sorted(values)}

    def usage_today(self, tenant: str) -> TenantUsage:
        """The tenant's counters for the current UTC day, with its gauges."""
        validate_tenant(tenant)
        with self._io_lock:
            values = self._counts_today(tenant)
            gauge_row = self._conn.execute(
                f"SELECT {', '.join(GAUGES)} FROM usage_gauges WHERE tenant = ?", (tenant,)
            ).fetchone()
            with self._pending_lock:
                waiting_gauges = dict(self._gauges.get(tenant, {}))
        values.update(zip(GAUGES, gauge_row or (0,) * len(GAUGES), strict=True))
        values.update(waiting_gauges)
        return TenantUsage(**values)

    def generated_tokens_today(self, tenant: str) -> int:
        """Tokens generated for the tenant on the current UTC day (what the
        daily generation quota counts): one primary-key read on each call."""
        validate_tenant(tenant)
        with self._io_lock:
            return self._counts_today(tenant)["completion_tokens"]

    def cost_today(self, tenant: str, prices: Prices) -> float:
        """Estimated USD spent by the tenant so far on the current UTC day:
        today's counters, and its current stored bytes for the part of the
        day gone by (what the daily budget is compared with)."""
        # Unix time has no leap seconds: every UTC day is 86,400 of its seconds.
        elapsed = (self._clock() % 86_400) / 86_400
        return estimated_cost(self.usage_today(tenant), prices, days_stored=elapsed)

    # -- internals -----------------------------------------------------------

    def _counts_today(self, tenant: str) -> dict[str, int]:
        """Today's stored counters plus those waiting; the caller holds _io_lock."""
        day = self._day(self._clock())
        row = self._conn.execute(
            f"SELECT {', '.join(COUNTERS)} FROM usage_days WHERE tenant = ? AND day = ?",
            (tenant, day),
        ).fetchone()
        values = dict(zip(COUNTERS, row or (0,) * len(COUNTERS), strict=True))
        key = (tenant, day)
        with self._pending_lock:
            waiting: list[Mapping[str, int]] = [dict(self._counts.get(key, {}))]
            waiting += [b.counts.get(key, {}) for b in self._outbox.values()]
        for counts in waiting:
            for counter, value in counts.items():
                values[counter] += value
        return values

    def _waiting(self) -> Iterator[tuple[tuple[str, str], Mapping[str, int]]]:
        """Counts not in usage_days yet: added, and sealed in the outbox
        (a handful of batches); the caller holds _pending_lock."""
        yield from self._counts.items()
        for batch in self._outbox.values():
            yield from batch.counts.items()

    @staticmethod
    def _day(now: float) -> str:
        return _day_name(int(now // 86_400))

    def _restore(self, counts: Counts, gauges: dict[str, dict[str, int]]) -> None:
        """Put a batch that failed to write back in front of what came since."""
        with self._pending_lock:
            for key, values in counts.items():
                waiting = self._counts.setdefault(key, dict.fromkeys(COUNTERS, 0))
                for name, value in values.items():
                    waiting[name] += value
            for tenant, values in gauges.items():
                # Gauges set since the failed batch are newer: they win.
                self._gauges[tenant] = {**values, **self._gauges.get(tenant, {})}

    def _flush_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.flush()
            except Exception as exc:
                # Kept waiting and tried again next time; a full or busy disk
                # must not end the flushes for the life of the process.
                log.warning("usage: could not write the counts (will retry): %s", exc)


def _add_counts(
    conn: sqlite3.Connection, counts: Mapping[tuple[str, str], Mapping[str, int]]
) -> None:
    """Add counters to usage_days, inside the caller's transaction."""
    conn.executemany(
        f"INSERT INTO usage_days (tenant, day, {', '.join(COUNTERS)}) "
        f"VALUES (?, ?, {', '.join('?' * len(COUNTERS))}) "
        "ON CONFLICT (tenant, day) DO UPDATE SET "
        + ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS),
        [(t, d, *(v.get(c, 0) for c in COUNTERS)) for (t, d), v in counts.items()],
    )


def _parts(counts: Counts) -> Iterator[Counts]:
    """The counters in pieces of at most MAX_BATCH_ROWS rows (one batch each)."""
    items = list(counts.items())
    for start in range(0, len(items), MAX_BATCH_ROWS):
        yield dict(items[start : start + MAX_BATCH_ROWS])


def _counts_to_json(counts: Mapping[tuple[str, str], Mapping[str, int]]) -> str:
    return json.dumps([[t, d, dict(v)] for (t, d), v in counts.items()])


def _counts_from_json(text: str) -> Counts:
    """An outbox row back (written by this ledger, so trusted)."""
    return {(t, d): dict(v) for t, d, v in json.loads(text)}


@functools.lru_cache(maxsize=4)
def _day_name(day_number: int) -> str:
    """YYYY-MM-DD of a day counted from 1970-01-01 (cached: formatting a
    date was a third of an add)."""
    return datetime.fromtimestamp(day_number * 86_400, UTC).strftime("%Y-%m-%d")


def _check_counts(values: dict[str, int]) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(f"{name} must be a whole number >= 0, got {value!r}")
