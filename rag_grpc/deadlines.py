"""The current call's deadline, carried in a context variable so calls to
remote services made on its behalf inherit it without passing it around."""

from __future__ import annotations

import time
from contextvars import ContextVar

_deadline: ContextVar[float | None] = ContextVar("rag_grpc_deadline", default=None)


def set_deadline(seconds_remaining: float | None) -> None:
    """Record the caller's deadline for this task (None: no deadline)."""
    _deadline.set(None if seconds_remaining is None else time.monotonic() + seconds_remaining)


def remaining(default: float) -> float:
    """Seconds left for an outgoing call: the caller's deadline, capped by default."""
    deadline = _deadline.get()
    if deadline is None:
        return default
    return max(0.0, min(default, deadline - time.monotonic()))
