"""What every job backend (SQLite here, NATS JetStream) enforces on jobs:
the shape of a job as a whole, the form of its id, and how a watcher follows
its status until it is done."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from rag_grpc.config import LimitsConfig
from rag_grpc.documents import Document, printable, validate_distinct_ids
from rag_grpc.errors import InvalidArgument
from rag_grpc.ingest.job_status import JobStatus

# A WatchJob stream ends after this long (the client watches again if it
# still cares), so a forgotten watcher cannot hold a stream for ever.
WATCH_MAX_S = 3600.0
_JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def validate_job_id(job_id: str) -> None:
    """Job ids are what submit returns: 32 lower-case hexadecimal characters."""
    if not _JOB_ID_RE.match(job_id):
        raise InvalidArgument(
            f"job id {printable(job_id[:40])}{'...' if len(job_id) > 40 else ''} is not a job "
            "id: they are 32 hexadecimal characters, as Submit returned"
        )


def validate_job(documents: Sequence[Document], limits: LimitsConfig) -> None:
    """The shape of a job as a whole: 1 to max_job_documents documents, valid
    and distinct ids. Each document's own checks come later, one by one."""
    if not documents:
        raise InvalidArgument("submit needs at least one document")
    if len(documents) > limits.max_job_documents:
        raise InvalidArgument(
            f"job has {len(documents)} documents; at most {limits.max_job_documents} "
            "per job (split it into several jobs)"
        )
    validate_distinct_ids(documents, " in the job")


async def watch_job(
    get: Callable[[str], Awaitable[JobStatus]],
    job_id: str,
    wait: Callable[[], Awaitable[None]],
    max_s: float = WATCH_MAX_S,
) -> AsyncIterator[JobStatus]:
    """A job's status now and after every change (checked after each wait()),
    until it is done or max_s has passed."""
    ends = time.monotonic() + max_s
    last: JobStatus | None = None
    while True:
        status = await get(job_id)
        if status != last:
            yield status
            last = status
        if status.state.done:
            return
        left = ends - time.monotonic()
        if left <= 0:
            return
        try:
            await asyncio.wait_for(wait(), left)
        except TimeoutError:
            return
