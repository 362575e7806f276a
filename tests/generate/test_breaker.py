"""CircuitBreaker (rag_grpc/generate/breaker.py) on its own: it opens after
repeated failures and lets one probe through after its reset time. With
Triton really failing: tests/test_triton.py."""

from __future__ import annotations

import time

from rag_grpc.generate.breaker import CircuitBreaker


def test_circuit_breaker_opens_then_lets_one_probe_through() -> None:
    breaker = CircuitBreaker(failures=2, reset_s=0.2)
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    time.sleep(0.25)
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.failure()  # the probe failed: open again
    assert breaker.state == "open"
    time.sleep(0.25)
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()
