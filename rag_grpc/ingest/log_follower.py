"""A replica following the NATS write log (<P>_WRITES).

Every process with a store follows the log in order, from the position its
SQLite committed with its last applied write, so all replicas apply the same
writes in the same order and converge; applying a write twice changes
nothing. The writers of this process wait here for their own entry
(`wait_applied`, then `outcome`).

A replica whose position is older than the oldest entry kept (stopped too
long, or a new one started from nothing after the log dropped its start)
would miss writes: it stops applying (`stalled` says why and how to restore
it from a peer's backup), and the writers refuse writes. A missing sequence
is fine only if the <P>_ERASED bucket says it was erased on purpose
(log_erasure.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.js import api

from rag_grpc import deadlines
from rag_grpc.documents import WriteResult
from rag_grpc.errors import DeadlineExceeded, InvalidArgument, RagError, Unavailable
from rag_grpc.index.writes import PreparedUpsert
from rag_grpc.ingest.log_entries import decode_entry
from rag_grpc.ingest.nats_client import NATS_ERRORS
from rag_grpc.security.usage import UsageBatch

if TYPE_CHECKING:
    from rag_grpc.ingest.nats_log import NatsIngestion

log = logging.getLogger(__name__)

# How often a replica drops its notes of which entries carried which
# documents for entries the log no longer holds.
PRUNE_INTERVAL_S = 600.0
# Outcomes kept for writers that have not collected theirs yet.
KEPT_OUTCOMES = 1024


class _Behind(Exception):
    """This replica cannot go on following the log (entries it needs are gone)."""


class LogFollower:
    """Applies a NatsIngestion's write log to its store, in order, once each."""

    def __init__(self, ingestion: NatsIngestion) -> None:
        self.ingestion = ingestion
        # The last log sequence applied to this store (its committed position).
        self.applied = 0
        # The highest log sequence this process has seen exist (stream info,
        # deliveries with their pending count, its own publishes): the head
        # `log_lag` is measured from.
        self.log_head = 0
        # Why this replica stopped applying the log (None while it follows
        # it); once set, it refuses writes until restored from a backup.
        self.stalled: str | None = None
        # Called with that reason when it is set (the server reports the
        # replica NOT_SERVING).
        self.stall_listeners: list[Callable[[str], Awaitable[None]]] = []
        # Log entries that could not be applied (recorded as applied, skipped).
        self.apply_errors = 0
        self._prune_at = 0.0
        self._applied_changed = asyncio.Condition()
        # Outcomes of applied writes by log sequence, for the writer waiting
        # on them: a result, or the error the entry failed with.
        self._results: dict[int, WriteResult | RagError] = {}

    @property
    def log_lag(self) -> int:
        """Log entries this replica knows exist and has not applied yet."""
        return max(self.log_head - self.applied, 0)

    def saw(self, seq: int) -> None:
        """Note that the log holds entries up to seq."""
        self.log_head = max(self.log_head, seq)

    def check_following(self) -> None:
        """Unavailable once this replica stopped applying the log."""
        if self.stalled:
            raise Unavailable(self.stalled)

    async def wait_applied(self, seq: int) -> None:
        """Return once this replica has applied the log up to seq."""
        timeout = deadlines.remaining(self.ingestion.config.apply_timeout_s)
        try:
            async with self._applied_changed:
                await asyncio.wait_for(
                    self._applied_changed.wait_for(
                        lambda: self.applied >= seq or self.stalled is not None
                    ),
                    timeout,
                )
        except TimeoutError:
            raise DeadlineExceeded(
                f"the write is in the log (sequence {seq}) but this replica has not applied "
                f"it within {timeout:.1f} s; it will be applied, check again later"
            ) from None
        self.check_following()

    async def reached(self, seq: int) -> None:
        """Return once this replica has applied the log up to seq (no time limit)."""
        async with self._applied_changed:
            await self._applied_changed.wait_for(lambda: self.applied >= seq)

    def outcome(self, seq: int) -> WriteResult:
        """The result of the applied entry seq; its error raised if it failed."""
        outcome = self._results.pop(seq, WriteResult(0, 0, 0))
        if isinstance(outcome, RagError):
            raise outcome
        return outcome

    async def run(self) -> None:
        """Follow the log until cancelled; resume after errors, stall for good
        when entries this store needs are gone."""
        stream = self.ingestion.writes_stream
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except _Behind as exc:
                await self._stall(str(exc))
                return
            except Exception:
                log.exception("following %s; resuming from %d", stream, self.applied)
                await asyncio.sleep(1)

    async def _stall(self, why: str) -> None:
        """Stop following for good: skipping the missing entries would leave
        this store silently different from the others."""
        self.stalled = (
            f"this replica stopped applying the write log {self.ingestion.writes_stream} after "
            f"entry {self.applied}: {why}. It refuses writes, and its searches answer from its "
            "store as of that entry. Restore it from a recent backup of a replica that is in "
            "step: `rag-grpc backup --target <that replica> --out peer.rag`, stop this server, "
            "move its data directory aside, `rag-grpc restore peer.rag --data-dir <its data "
            "directory>`, and start it again; it resumes the log from the backup's position"
        )
        log.error("%s", self.stalled)
        for listener in self.stall_listeners:
            try:
                await listener(self.stalled)
            except Exception:
                log.exception("reporting that this replica stopped applying the log")

    async def _check_window(self) -> None:
        """Raise _Behind when the log no longer holds every entry after this
        store's position; drop notes of entries it no longer holds."""
        ingestion = self.ingestion
        info = await ingestion.js.stream_info(ingestion.writes_stream)
        first, last = int(info.state.first_seq), int(info.state.last_seq)
        self.saw(last)
        if self.applied > last:
            raise _Behind(
                f"the log ends at entry {last}, before this store's position: the stream was "
                "deleted and created again, or this data directory follows another log"
            )
        if self.applied + 1 < first:
            await self._check_gap(self.applied + 1, first)
        store = ingestion.retriever.store
        await ingestion.in_thread(lambda: store.drop_log_documents(ingestion.log_name, below=first))
        self._prune_at = time.monotonic() + PRUNE_INTERVAL_S

    async def _check_gap(self, start: int, end: int) -> None:
        """Entries start..end-1 are missing: fine if each was erased on purpose
        (its other documents published again later), else _Behind."""
        for seq in range(start, end):
            try:
                await self.ingestion.erased.get(str(seq))
            except nats.js.errors.KeyNotFoundError:
                raise _Behind(
                    f"the log no longer holds entries {start} to {end - 1}, which it has not "
                    "applied: the log's retention (ingestion.log_max_age_s, log_max_bytes) "
                    "dropped them"
                ) from None

    async def _follow(self) -> None:
        ingestion = self.ingestion
        await self._check_window()
        if self.applied:
            config = api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self.applied + 1,
            )
        else:
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
        sub = await ingestion.js.subscribe(
            ingestion.writes_subject,
            stream=ingestion.writes_stream,
            ordered_consumer=True,
            config=config,
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                seq = int(msg.metadata.sequence.stream)
                self.saw(seq + int(msg.metadata.num_pending or 0))
                if seq <= self.applied:
                    continue
                if seq > self.applied + 1:
                    await self._check_gap(self.applied + 1, seq)
                if time.monotonic() > self._prune_at:
                    await self._check_window()
                result = await ingestion.in_thread(self.apply_entry, msg.data, seq)
                async with self._applied_changed:
                    self.applied = seq
                    self._results[seq] = result
                    while len(self._results) > KEPT_OUTCOMES:
                        self._results.pop(next(iter(self._results)))
                    self._applied_changed.notify_all()
        finally:
            with contextlib.suppress(*NATS_ERRORS):
                await sub.unsubscribe()

    def apply_entry(self, data: bytes, seq: int) -> WriteResult | RagError:
        """Apply one log entry. An entry that cannot be applied (malformed,
        invalid, or refused by this store) is recorded as applied with its
        error: counted, logged once, never retried, so one bad entry cannot
        stop this replica applying the ones after it."""
        ingestion = self.ingestion
        position = (ingestion.log_name, seq)
        store, writes = ingestion.retriever.store, ingestion.retriever.writes
        try:
            try:
                record = json.loads(data)
            except ValueError as exc:
                raise InvalidArgument(f"malformed write: {exc}") from None
            prepared = decode_entry(record)
            if isinstance(prepared, UsageBatch):
                # Its own transaction skips it if already added (a crash
                # after that commit and before the position below).
                if ingestion.usage is not None:
                    ingestion.usage.apply_batch(prepared, ingestion.log_name, seq)
                store.set_position(*position)
                return WriteResult(0, 0, 0)
            if isinstance(prepared, PreparedUpsert):
                # Noted before the write is applied (a fact about the log,
                # whatever the write's outcome here), so a forget finds every
                # entry holding the documents even if this process stops between.
                store.record_log_documents(
                    ingestion.log_name,
                    seq,
                    prepared.namespace,
                    [d.id for d in prepared.documents if isinstance(d.id, str)],
                )
                return writes.apply_upsert(prepared, position)
            return writes.apply_delete(prepared, position)
        except (RagError, ValueError, TypeError) as exc:
            if not isinstance(exc, RagError):
                exc = InvalidArgument(f"the write cannot be applied: {exc}")
            self.apply_errors += 1
            ingestion.telemetry.record("write_log_errors", 1)
            log.error(
                "write %d of %s cannot be applied, skipped: %s", seq, ingestion.writes_stream, exc
            )
            store.set_position(*position)
            return exc
