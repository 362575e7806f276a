"""The current call's deadline and cancellation, carried in a context
variable: core code checks them between stages (so an expired or cancelled
call stops before it writes), and calls to remote services made on its
behalf inherit the deadline without passing it around."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from rag_grpc.errors import Cancelled, DeadlineExceeded


@dataclass
class CallScope:
    """One incoming call: its absolute deadline and whether the caller gave up."""

    deadline: float | None
    cancelled: threading.Event = field(default_factory=threading.Event)


P = ParamSpec("P")
T = TypeVar("T")

_scope: ContextVar[CallScope | None] = ContextVar("rag_grpc_call", default=None)


def enter_call(seconds_remaining: float | None) -> CallScope:
    """Start a scope for the current task (None: no deadline)."""
    deadline = None if seconds_remaining is None else time.monotonic() + seconds_remaining
    scope = CallScope(deadline)
    _scope.set(scope)
    return scope


def current() -> CallScope | None:
    """The scope of the call this code runs for, if any."""
    return _scope.get()


def remaining(default: float) -> float:
    """Seconds left for an outgoing call: the caller's deadline, capped by default."""
    scope = _scope.get()
    if scope is None or scope.deadline is None:
        return default
    return max(0.0, min(default, scope.deadline - time.monotonic()))


def check(stage: str) -> None:
    """Raise if the caller's deadline passed or the caller cancelled, before ``stage``."""
    scope = _scope.get()
    if scope is None:
        return
    if scope.cancelled.is_set():
        raise Cancelled(f"the call was cancelled before {stage}")
    if scope.deadline is not None and time.monotonic() >= scope.deadline:
        raise DeadlineExceeded(f"the deadline passed before {stage}; nothing was changed")


async def in_thread(
    executor: Executor | None, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run blocking core work on the worker pool so the event loop stays free."""
    loop = asyncio.get_running_loop()
    # The thread runs in a copy of this task's context, so core code sees
    # the call's deadline and cancellation (deadlines.check).
    context = contextvars.copy_context()
    future = loop.run_in_executor(executor, functools.partial(context.run, fn, *args, **kwargs))
    try:
        return await future
    except asyncio.CancelledError:
        scope = current()
        if scope is not None:
            scope.cancelled.set()
        raise
