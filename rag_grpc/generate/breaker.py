"""The circuit breaker in front of Triton: after repeated failures, calls stop
going to a failing server for a while, then one probe call decides whether
it is back. Pure state, no I/O: TritonGenerator asks it before each call and
tells it how each call ended."""

from __future__ import annotations

import time


class CircuitBreaker:
    """Closed until `failures` calls fail in a row; then open for `reset_s`,
    after which one probe call is let through (half-open) to decide."""

    def __init__(self, failures: int, reset_s: float) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if time.monotonic() - self._opened_at >= self.reset_s:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        self._consecutive += 1
        self._probing = False
        if self._consecutive >= self.failures or self._opened_at is not None:
            self._opened_at = time.monotonic()

    def abandon_probe(self) -> None:
        """The probe call ended without saying whether Triton works (its
        caller cancelled, its deadline passed): the next call probes instead.
        Without this, an abandoned probe would keep the circuit from ever
        closing."""
        self._probing = False
