"""Sections of the write path: where ingestion jobs queue and the write log
lives ([ingestion]), and how long documents are kept ([retention])."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from rag_grpc.config.base import Section


class IngestionConfig(Section):
    """Where ingestion jobs queue: the SQLite database in the data dir, or
    NATS JetStream shared by several workers and retrieval replicas."""

    queue: Literal["sqlite", "nats"] = "sqlite"
    # One URL, or the nodes of a cluster separated by commas.
    nats_url: str = "nats://127.0.0.1:4222"
    # Names of the JetStream streams and bucket: <prefix>_JOBS, <prefix>_WRITES
    # and <prefix>_STATUS (subjects <prefix>.jobs, <prefix>.writes, lower case).
    nats_prefix: str = Field("RAG", pattern=r"^[A-Z][A-Z0-9_]{0,31}$")
    # JetStream replicas of the streams (3 on a three-node NATS cluster).
    nats_replicas: int = Field(1, ge=1, le=5)
    # This process takes documents from the queue (chunks and embeds them).
    worker: bool = True
    # This process applies the write log to its store and index (a replica).
    apply: bool = True
    # Documents fetched and embedded together by a worker.
    batch_documents: int = Field(32, ge=1, le=1024)
    # A document not acknowledged in this time goes to another worker, at
    # most max_deliver times; then it fails with its error.
    ack_wait_s: float = Field(60.0, gt=0)
    max_deliver: int = Field(5, ge=1, le=100)
    # Documents queued and not yet processed, past which Submit is refused.
    max_pending_documents: int = Field(200_000, ge=1)
    connect_timeout_s: float = Field(5.0, gt=0)
    # How long Upsert/Delete wait for this replica to apply their write.
    apply_timeout_s: float = Field(30.0, gt=0)
    # A WatchJob stream ends after this long even if the job goes on (the
    # client watches again), so forgotten watchers cannot pile up.
    watch_max_s: float = Field(3600.0, gt=0)
    # Retention of the <P>_WRITES log: NATS drops the oldest entries past
    # either limit (0: no limit). A replica whose position falls out of this
    # window stops applying and is restored from a peer's backup, so keep it
    # longer than a replica may be down. Set them alike on every process: the
    # last one to start applies its own to the stream.
    log_max_age_s: float = Field(7 * 86400.0, ge=0)
    log_max_bytes: int = Field(10 * 2**30, ge=0)


class RetentionConfig(Section):
    """Time to live of documents, per namespace; a background sweeper deletes
    documents not written for longer (no entry: kept for ever)."""

    ttl_s: dict[str, float] = Field(default_factory=dict)
    sweep_interval_s: float = Field(60.0, gt=0)

    @field_validator("ttl_s")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for namespace, ttl in value.items():
            if ttl <= 0:
                raise ValueError(f"retention.ttl_s[{namespace!r}] must be positive, got {ttl}")
        return value
