"""Tenants' usage on the NATS write log.

Every flush interval this process publishes the batches of counters its
ledger sealed since the last (`UsageLedger`, replicated); every replica adds
each usage entry of the log to its own ledger once (log_follower.py), so all
report the same totals."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from rag_grpc.ingest.log_entries import encode_usage, entry_bytes
from rag_grpc.ingest.nats_client import NATS_ERRORS

if TYPE_CHECKING:
    from rag_grpc.ingest.nats_log import NatsIngestion

log = logging.getLogger(__name__)


class UsagePublisher:
    """Publishes a NatsIngestion's sealed usage batches to its write log."""

    def __init__(self, ingestion: NatsIngestion) -> None:
        self.ingestion = ingestion
        # The log's last sequence when this process connected.
        self.log_end_at_start = 0
        # Whether batches a previous run left in the outbox may be published
        # (they are not in the log, or have been applied from it since).
        self.settled = False

    async def run(self) -> None:
        """Every flush interval, publish the usage batches sealed here."""
        ingestion = self.ingestion
        assert ingestion.usage is not None
        if ingestion.config.apply:
            # A batch left in the outbox by the previous run may be in the log
            # already: applying the log up to its end as of connecting takes
            # it out of the outbox first, so it is never published twice.
            await ingestion.follower.reached(self.log_end_at_start)
        self.settled = True
        while True:
            await asyncio.sleep(ingestion.usage.flush_interval_s)
            try:
                await self.publish()
            except Exception:
                log.exception("usage: publishing to %s (will retry)", ingestion.writes_stream)

    async def publish(self) -> None:
        """Publish the ledger's sealed batches not published yet, oldest
        first; one that fails stays for the next try. The batch id is the
        entry's Nats-Msg-Id, so NATS drops a retry of one whose ack was lost
        (within its de-duplication window)."""
        ingestion = self.ingestion
        ledger = ingestion.usage
        if ledger is None:
            return
        for batch in ledger.unpublished():
            data = entry_bytes(encode_usage(batch))
            try:
                await ingestion.js.publish(
                    ingestion.writes_subject, data, headers={"Nats-Msg-Id": batch.batch_id}
                )
            except NATS_ERRORS as exc:
                log.warning("usage: NATS at %s: %s; publishing again shortly", ingestion.where, exc)
                return
            await asyncio.to_thread(
                ledger.published, batch.batch_id, applied_here=ingestion.config.apply
            )

    async def flush_at_stop(self) -> None:
        """Seal and publish the usage counted since the last batch; what fails
        stays in the ledger's outbox for the next run."""
        ingestion = self.ingestion
        ledger = ingestion.usage
        if ledger is None or not self.settled or not ingestion.nc.is_connected:
            return
        try:
            await asyncio.to_thread(ledger.flush)
            await asyncio.wait_for(self.publish(), ingestion.config.connect_timeout_s)
        except Exception as exc:
            log.warning("usage: the last batch was not published (kept for next start): %s", exc)
