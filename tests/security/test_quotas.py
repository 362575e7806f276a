"""Quotas: the token bucket's timing, rate limits with a retry time, each
storage quota at its boundary, daily generation and budget, and messages
that name the tenant and the numbers."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest

from rag_grpc.errors import RagError, ResourceExhausted
from rag_grpc.security.model import Budget, Quota, TenantUsage
from rag_grpc.security.quotas import QuotaEnforcer, QuotaExceeded, TokenBucket


class Clock:
    """Seconds the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_the_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate_per_s=2, burst=2, clock=clock)
    assert bucket.take() == 0 and bucket.take() == 0
    assert bucket.take() == pytest.approx(0.5)  # refused: nothing taken
    clock.now += 0.25
    assert bucket.take() == pytest.approx(0.25)
    clock.now += 0.25
    assert bucket.take() == 0
    clock.now += 60  # a long pause refills up to the burst, no further
    assert [bucket.take() for _ in range(3)] == [0, 0, pytest.approx(0.5)]
    assert bucket.take(2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="never"):
        bucket.take(3)


def test_waiting_the_given_time_is_always_enough() -> None:
    clock = Clock(0.1)
    bucket = TokenBucket(rate_per_s=3, burst=3, clock=clock)
    for _ in range(50):
        wait = bucket.take()
        if wait:
            clock.now += wait
            assert bucket.take() == 0


def test_bucket_is_thread_safe() -> None:
    bucket = TokenBucket(rate_per_s=100, burst=100, clock=Clock())  # time stands still
    allowed: list[int] = []

    def taker() -> None:
        mine = sum(1 for _ in range(50) if bucket.take() == 0)
        allowed.append(mine)

    threads = [threading.Thread(target=taker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 100


def test_rate_quota_refuses_with_a_retry_time() -> None:
    clock = Clock()
    enforcer = QuotaEnforcer(clock=clock)
    quota = Quota(requests_per_s=5)
    for _ in range(5):
        enforcer.check_rate("acme", quota)
    with pytest.raises(QuotaExceeded) as refused:
        enforcer.check_rate("acme", quota)
    exc = refused.value
    assert (exc.subject, exc.quota, exc.limit) == ("tenant:acme", "requests_per_s", 5)
    assert exc.retry_after_s == pytest.approx(0.2)
    assert str(exc) == "tenant acme may make 5 requests per second; retry in 0.2 s"
    enforcer.check_rate("globex", quota)  # each tenant has its own bucket
    clock.now += 0.2
    enforcer.check_rate("acme", quota)


def test_a_new_rate_takes_effect_at_once() -> None:
    clock = Clock()
    enforcer = QuotaEnforcer(clock=clock)
    enforcer.check_rate("acme", Quota(requests_per_s=1))
    with pytest.raises(QuotaExceeded):
        enforcer.check_rate("acme", Quota(requests_per_s=1))
    for _ in range(10):
        enforcer.check_rate("acme", Quota(requests_per_s=10))


def test_slow_rates_allow_one_request_at_a_time() -> None:
    clock = Clock()
    enforcer = QuotaEnforcer(clock=clock)
    enforcer.check_rate("acme", Quota(requests_per_s=0.5))
    with pytest.raises(QuotaExceeded) as refused:
        enforcer.check_rate("acme", Quota(requests_per_s=0.5))
    assert refused.value.retry_after_s == pytest.approx(2.0)
    with pytest.raises(QuotaExceeded, match="no requests") as zero:
        enforcer.check_rate("acme", Quota(requests_per_s=0))
    assert zero.value.retry_after_s is None


def test_no_quota_means_unlimited() -> None:
    enforcer = QuotaEnforcer(clock=Clock())
    unlimited = Quota()
    huge = TenantUsage(documents=10**12, vectors=10**12, stored_bytes=10**15)
    for _ in range(1000):
        enforcer.check_rate("acme", unlimited)
    enforcer.check_write(
        "acme",
        unlimited,
        huge,
        adding_documents=10**9,
        adding_vectors=10**9,
        adding_bytes=10**12,
        adding_namespaces=10**6,
    )
    enforcer.check_generation("acme", unlimited, used_today=10**12, requested_tokens=10**6)
    assert enforcer.check_budget("acme", None, cost_today=10**6) is False


@pytest.mark.parametrize(
    ("name", "argument", "unit", "verb"),
    [
        ("documents", "adding_documents", "documents", "store"),
        ("vectors", "adding_vectors", "vectors", "store"),
        ("stored_bytes", "adding_bytes", "bytes", "store"),
        ("namespaces", "adding_namespaces", "namespaces", "have"),
    ],
)
def test_each_write_quota_at_its_boundary(name: str, argument: str, unit: str, verb: str) -> None:
    enforcer = QuotaEnforcer(clock=Clock())
    quota = Quota(**{name: 100})
    current = {"documents": 0, "vectors": 0, "stored_bytes": 0, "namespaces": 0, name: 90}

    enforcer.check_write("acme", quota, current, **{argument: 10})  # exactly at the limit
    with pytest.raises(QuotaExceeded) as refused:
        enforcer.check_write("acme", quota, current, **{argument: 11})
    exc = refused.value
    assert isinstance(exc, ResourceExhausted) and isinstance(exc, RagError)
    assert (exc.subject, exc.quota, exc.limit, exc.used) == ("tenant:acme", name, 100, 90)
    assert exc.retry_after_s is None
    assert str(exc).startswith(
        f"tenant acme may {verb} 100 {unit}; it has 90 and this write adds 11"
    )
    # Over the limit already (it was lowered): shrinking or staying is allowed.
    enforcer.check_write("acme", quota, {**current, name: 150}, **{argument: 0})
    enforcer.check_write("acme", quota, {**current, name: 150}, **{argument: -5})


def test_write_quota_message_from_the_issue() -> None:
    enforcer = QuotaEnforcer(clock=Clock())
    with pytest.raises(QuotaExceeded) as refused:
        enforcer.check_write(
            "acme",
            Quota(documents=100000),
            TenantUsage(documents=99990),
            adding_documents=20,
        )
    assert "tenant acme may store 100000 documents; it has 99990 and this write adds 20" in str(
        refused.value
    )


def test_a_namespace_quota_needs_the_namespace_count() -> None:
    enforcer = QuotaEnforcer(clock=Clock())
    with pytest.raises(ValueError, match="namespaces"):
        enforcer.check_write(
            "acme", Quota(namespaces=3), TenantUsage(documents=1), adding_namespaces=1
        )
    # Not needed when the write creates no namespace.
    enforcer.check_write("acme", Quota(namespaces=3), TenantUsage(), adding_documents=1)


def test_daily_generation_at_its_boundary() -> None:
    wall = Clock(datetime(2026, 5, 1, 18, 0, tzinfo=UTC).timestamp())
    enforcer = QuotaEnforcer(clock=Clock(), wall_clock=wall)
    quota = Quota(generated_tokens_per_day=200000)
    enforcer.check_generation("acme", quota, used_today=199000, requested_tokens=1000)
    with pytest.raises(QuotaExceeded) as refused:
        enforcer.check_generation("acme", quota, used_today=199000, requested_tokens=1001)
    exc = refused.value
    assert (exc.quota, exc.limit, exc.used) == ("generated_tokens_per_day", 200000, 199000)
    assert exc.retry_after_s == pytest.approx(6 * 3600)  # until 00:00 UTC
    assert str(exc) == (
        "tenant acme may generate 200000 tokens per UTC day; it has generated 199000 today "
        "and this request asks for up to 1001 (ask for at most 1000 tokens, or retry after "
        "00:00 UTC (in 6.0 h))"
    )
    # More than a whole day's allowance: waiting will not help.
    with pytest.raises(QuotaExceeded) as never:
        enforcer.check_generation("acme", quota, used_today=0, requested_tokens=200001)
    assert never.value.retry_after_s is None


def test_budget_refuses_generation_once_spent() -> None:
    wall = Clock(datetime(2026, 5, 1, 23, 30, tzinfo=UTC).timestamp())
    enforcer = QuotaEnforcer(clock=Clock(), wall_clock=wall)
    refusing = Budget(usd_per_day=10.0, refuse_generation=True)
    assert enforcer.check_budget("acme", refusing, cost_today=9.99) is False
    with pytest.raises(QuotaExceeded) as refused:
        enforcer.check_budget("acme", refusing, cost_today=10.0)
    exc = refused.value
    assert (exc.subject, exc.quota, exc.limit, exc.used) == ("tenant:acme", "usd_per_day", 10, 10)
    assert exc.retry_after_s == pytest.approx(1800)
    assert "tenant acme has an estimated spend of $10.00 today" in str(exc)
    assert "budget of $10.00 per day" in str(exc) and "(in 30 min)" in str(exc)
    # A budget that only warns reports it and lets the request through.
    assert enforcer.check_budget("acme", Budget(usd_per_day=10.0), cost_today=12.5) is True
