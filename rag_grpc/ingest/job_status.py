"""What an ingestion job's progress looks like, to the queue that stores it,
the servicer that sends it and the client that receives it. Kept apart from
the queue so the client can use it without loading the retrieval core."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class JobState(StrEnum):
    """Lifecycle of a job. A StrEnum: the stored column and callers comparing
    with "SUCCEEDED" see the plain name."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @property
    def done(self) -> bool:
        """Whether the job has ended (it changes no more)."""
        return self in (JobState.SUCCEEDED, JobState.FAILED)


@dataclass(frozen=True)
class JobStatus:
    """A job's progress as stored; times are Unix seconds."""

    job_id: str
    namespace: str
    state: JobState
    total: int
    processed: int
    failed: int
    chunks: int
    errors: tuple[tuple[str, str], ...]
    created_at: float
    updated_at: float

    @property
    def done(self) -> bool:
        """Whether the job has ended."""
        return self.state.done
