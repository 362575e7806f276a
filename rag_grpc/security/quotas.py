"""Quota enforcement: a token bucket per tenant for its request rate, and
checks of a write, a generation or the day's spend against the tenant's
quota and budget, made before any work is done.

Buckets live in this process: with several replicas behind a balancer each
one allows the full rate (an operator divides the policy's rate by the
replica count where that matters).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping

from rag_grpc.errors import ResourceExhausted
from rag_grpc.security.model import Budget, Quota, TenantUsage

# Float slack when comparing tokens: a caller that waits exactly the
# retry_after it was given must get through, whatever the rounding.
_EPSILON = 1e-9


class QuotaExceeded(ResourceExhausted):
    """A tenant's quota or budget refuses the request. subject ("tenant:acme")
    and quota ("documents") name it for google.rpc.QuotaFailure; limit and
    used give the numbers (used: what the tenant has before this request; for
    a rate, the rate itself, all of it spent); retry_after_s says when a retry
    can succeed (None: waiting alone will not help)."""

    def __init__(
        self,
        message: str,
        *,
        subject: str,
        quota: str,
        limit: float,
        used: float,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.subject = subject
        self.quota = quota
        self.limit = limit
        self.used = used
        self.retry_after_s = retry_after_s


class TokenBucket:
    """Allows rate_per_s takes a second on average and up to burst at once.
    Thread-safe; clock is monotonic seconds (injectable for tests)."""

    def __init__(
        self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not rate_per_s > 0 or not burst >= 1:
            raise ValueError(f"a bucket needs rate > 0 and burst >= 1, got {rate_per_s}, {burst}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._stamp = clock()

    def take(self, n: float = 1) -> float:
        """Take n tokens and return 0, or take nothing and return the seconds
        until n would be there."""
        if n > self.burst:
            raise ValueError(f"{n} tokens can never be taken from a bucket of {self.burst}")
        with self._lock:
            now = self._clock()
            # max(): a clock that steps back must not drain the bucket.
            elapsed = max(0.0, now - self._stamp)
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate_per_s)
            self._stamp = now
            if self._tokens + _EPSILON >= n:
                self._tokens = max(0.0, self._tokens - n)
                return 0.0
            return (n - self._tokens) / self.rate_per_s


class QuotaEnforcer:
    """Checks requests against tenants' quotas and budgets; each check
    raises QuotaExceeded with a message a person can act on, or returns.

    clock (monotonic seconds) drives the rate buckets; wall_clock (Unix
    seconds) finds the next UTC midnight, when daily allowances reset.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}

    def check_rate(self, tenant: str, quota: Quota) -> None:
        """Count one request against the tenant's requests_per_s."""
        rate = quota.requests_per_s
        if rate is None:
            return
        subject = _subject(tenant)
        if rate <= 0:
            raise QuotaExceeded(
                f"tenant {tenant} may make no requests (its requests_per_s quota is 0); "
                "ask an operator to raise it",
                subject=subject,
                quota="requests_per_s",
                limit=rate,
                used=0,
            )
        with self._lock:
            bucket = self._buckets.get(tenant)
            # A reloaded policy with a new rate takes effect at once.
            if bucket is None or bucket.rate_per_s != rate:
                bucket = TokenBucket(rate, max(1.0, rate), self._clock)
                self._buckets[tenant] = bucket
        wait = bucket.take()
        if wait > 0:
            raise QuotaExceeded(
                f"tenant {tenant} may make {rate:g} requests per second; retry in {wait:.3g} s",
                subject=subject,
                quota="requests_per_s",
                limit=rate,
                used=rate,
                retry_after_s=wait,
            )

    def check_write(
        self,
        tenant: str,
        quota: Quota,
        current: TenantUsage | Mapping[str, int],
        *,
        adding_documents: int = 0,
        adding_vectors: int = 0,
        adding_bytes: int = 0,
        adding_namespaces: int = 0,
    ) -> None:
        """Refuse a write that would take the tenant past a storage quota;
        reaching a limit exactly is allowed. current: the tenant's stored
        documents, vectors and stored_bytes (a TenantUsage or a mapping) and,
        when the write adds namespaces under a namespace quota, a
        "namespaces" count (only a mapping can carry it). A write that adds
        nothing to a quantity (a replace, a delete) is never refused for it,
        so a tenant over a lowered quota can still shrink."""
        checks = (
            ("documents", "store", "documents", adding_documents),
            ("vectors", "store", "vectors", adding_vectors),
            ("stored_bytes", "store", "bytes", adding_bytes),
            ("namespaces", "have", "namespaces", adding_namespaces),
        )
        for name, verb, unit, adding in checks:
            limit: int | None = getattr(quota, name)
            if limit is None or adding <= 0:
                continue
            used = _count(current, name)
            if used + adding > limit:
                raise QuotaExceeded(
                    f"tenant {tenant} may {verb} {limit} {unit}; it has {used} and this write "
                    f"adds {adding} (delete some, or ask an operator to raise the quota)",
                    subject=_subject(tenant),
                    quota=name,
                    limit=limit,
                    used=used,
                )

    def check_generation(
        self, tenant: str, quota: Quota, used_today: int, requested_tokens: int
    ) -> None:
        """Refuse a generation whose requested tokens would take the tenant
        past its generated_tokens_per_day (reaching it exactly is allowed)."""
        limit = quota.generated_tokens_per_day
        if limit is None or used_today + requested_tokens <= limit:
            return
        left = max(0, limit - used_today)
        retry = self._until_midnight()
        if requested_tokens > limit:
            advice, retry_after = f"ask for at most {limit} tokens", None
        else:
            advice = f"ask for at most {left} tokens, or retry after 00:00 UTC (in {_hours(retry)})"
            retry_after = retry
        raise QuotaExceeded(
            f"tenant {tenant} may generate {limit} tokens per UTC day; it has generated "
            f"{used_today} today and this request asks for up to {requested_tokens} ({advice})",
            subject=_subject(tenant),
            quota="generated_tokens_per_day",
            limit=limit,
            used=used_today,
            retry_after_s=retry_after,
        )

    def check_budget(self, tenant: str, budget: Budget | None, cost_today: float) -> bool:
        """Whether the tenant's estimated spend today has reached its daily
        budget (for the metric); raises instead when the budget refuses
        generation past it."""
        if budget is None or cost_today < budget.usd_per_day:
            return False
        if not budget.refuse_generation:
            return True
        retry = self._until_midnight()
        raise QuotaExceeded(
            f"tenant {tenant} has an estimated spend of ${cost_today:.2f} today, which reaches "
            f"its budget of ${budget.usd_per_day:.2f} per day; generation is refused until "
            f"00:00 UTC (in {_hours(retry)}), or until an operator raises the budget",
            subject=_subject(tenant),
            quota="usd_per_day",
            limit=budget.usd_per_day,
            used=cost_today,
            retry_after_s=retry,
        )

    def _until_midnight(self) -> float:
        """Seconds until the next UTC midnight (Unix days are 86,400 s)."""
        now = self._wall_clock()
        return (math.floor(now / 86_400) + 1) * 86_400 - now


def _subject(tenant: str) -> str:
    return f"tenant:{tenant}"


def _count(current: TenantUsage | Mapping[str, int], name: str) -> int:
    value = current.get(name) if isinstance(current, Mapping) else getattr(current, name, None)
    if value is None:
        # Counting a missing figure as 0 would let the write through.
        raise ValueError(f"check_write needs the tenant's current {name} count")
    return int(value)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{math.ceil(seconds / 60)} min"
