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
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rag_grpc.errors import InvalidArgument
from rag_grpc.security.model import Prices
from rag_grpc.security.policy import TENANT_NAME
from rag_grpc.store.sqlite import connect, private_file

log = logging.getLogger(__name__)

# Added to, per UTC day.
COUNTERS = ("embedding_tokens", "prompt_tokens", "completion_tokens", "searches", "asks")
# Set to the latest value, per tenant.
GAUGES = ("documents", "vectors", "stored_bytes")

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
"""


@dataclass(frozen=True)
class TenantUsage:
    """A tenant's usage: counters summed over the days asked for, gauges as
    last set."""

    embedding_tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    searches: int = 0
    asks: int = 0
    documents: int = 0
    vectors: int = 0
    stored_bytes: int = 0


def validate_tenant(tenant: str) -> str:
    """The tenant name, if it is one a policy may hold."""
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
    ) -> None:
        if flush_interval_s <= 0:
            raise ValueError("flush_interval_s must be positive")
        self.path = path
        self._clock = clock
        private_file(path)
        self._conn = connect(path)
        self._conn.executescript(SCHEMA)
        # _pending_lock guards the waiting changes and is all an add takes;
        # _io_lock serialises the connection, so a read never sees a batch
        # both waiting and stored, or neither.
        self._pending_lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._counts: dict[tuple[str, str], dict[str, int]] = {}
        self._gauges: dict[str, dict[str, int]] = {}
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
        """Write what is waiting in one durable transaction. On failure it
        stays waiting (and is tried again) and the error is raised."""
        with self._io_lock:
            with self._pending_lock:
                counts, self._counts = self._counts, {}
                gauges, self._gauges = self._gauges, {}
            if not counts and not gauges:
                return
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    f"INSERT INTO usage_days (tenant, day, {', '.join(COUNTERS)}) "
                    f"VALUES (?, ?, {', '.join('?' * len(COUNTERS))}) "
                    "ON CONFLICT (tenant, day) DO UPDATE SET "
                    + ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS),
                    [(t, d, *(v[c] for c in COUNTERS)) for (t, d), v in counts.items()],
                )
                for tenant, values in gauges.items():
                    names = list(values)
                    conn.execute(
                        f"INSERT INTO usage_gauges (tenant, {', '.join(names)}) "
                        f"VALUES (?, {', '.join('?' * len(names))}) ON CONFLICT (tenant) "
                        "DO UPDATE SET " + ", ".join(f"{n} = excluded.{n}" for n in names),
                        (tenant, *values.values()),
                    )
                conn.execute("COMMIT")
            except BaseException:
                # SQLite has already rolled back after some errors (a full disk).
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._restore(counts, gauges)
                raise

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
                waiting = [(t, v) for (t, _), v in self._counts.items()]
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
        with self._pending_lock:
            for counter, value in self._counts.get((tenant, day), {}).items():
                values[counter] += value
        return values

    @staticmethod
    def _day(now: float) -> str:
        return _day_name(int(now // 86_400))

    def _restore(
        self, counts: dict[tuple[str, str], dict[str, int]], gauges: dict[str, dict[str, int]]
    ) -> None:
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


@functools.lru_cache(maxsize=4)
def _day_name(day_number: int) -> str:
    """YYYY-MM-DD of a day counted from 1970-01-01 (cached: formatting a
    date was a third of an add)."""
    return datetime.fromtimestamp(day_number * 86_400, UTC).strftime("%Y-%m-%d")


def _check_counts(values: dict[str, int]) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(f"{name} must be a whole number >= 0, got {value!r}")
