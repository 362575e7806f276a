"""What the NATS ingestion modules share about the client: the errors NATS
raises, sorted by what to do about them, and the room a message needs beyond
its payload."""

from __future__ import annotations

import nats.errors
import nats.js.errors

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
