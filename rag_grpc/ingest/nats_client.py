"""What the NATS ingestion modules share about the client: connecting,
creating the streams and buckets they use, the errors NATS raises, sorted
by what to do about them, and the room a message needs beyond its payload."""

from __future__ import annotations

import logging
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from rag_grpc.config import IngestionConfig

log = logging.getLogger(__name__)

# Any failure talking to NATS: callers turn it into Unavailable.
NATS_ERRORS = (
    nats.errors.Error,
    nats.js.errors.Error,
    TimeoutError,
    OSError,
)
# NATS could not be reached or had no leader to answer (a cluster electing):
# the next try may succeed, and every document of a batch would fail alike.
NATS_UNREACHABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
    OSError,
)
# Room left in a message for headers and framing.
PAYLOAD_MARGIN = 4096


async def connect(config: IngestionConfig) -> Any:
    """A connection to ingestion.nats_url that reconnects for ever."""
    return await nats.connect(
        # Several URLs (comma-separated): the nodes of a NATS cluster.
        servers=[url.strip() for url in config.nats_url.split(",") if url.strip()],
        connect_timeout=config.connect_timeout_s,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
    )


async def ensure_stream(js: Any, config: api.StreamConfig, retention: bool = False) -> None:
    """Create the stream, or with retention bring an existing one's limits
    (max_age, max_bytes) to the configured ones."""
    try:
        info = await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(config)
        return
    current = info.config
    wanted = (config.max_age or 0.0, config.max_bytes or -1, config.duplicate_window)
    now = (current.max_age or 0.0, current.max_bytes or -1, current.duplicate_window or 0.0)
    if retention and any(abs(a - b) > 1e-3 for a, b in zip(wanted, now, strict=True)):
        await js.update_stream(
            current.evolve(
                max_age=config.max_age,
                max_bytes=config.max_bytes,
                duplicate_window=config.duplicate_window,
            )
        )
        log.info(
            "%s now keeps entries for %s s and up to %s bytes (0/-1: no limit; was %s s, %s)",
            config.name,
            wanted[0],
            wanted[1],
            now[0],
            now[1],
        )


async def key_value(js: Any, name: str, replicas: int) -> Any:
    """The key-value bucket, created (one value per key) if missing."""
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(bucket=name, history=1, replicas=replicas)
