"""Per-tenant limits with a fake clock: token bucket maths, settling, concurrency, length."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router import (
    Admission,
    AlreadySettled,
    Denied,
    DenyReason,
    Limiter,
    TenantLimits,
    TokenBucket,
)

RPM = TenantLimits(requests_per_minute=60)
TPM = TenantLimits(tokens_per_minute=1000)


def admit(limiter: Limiter, limits: TenantLimits, tokens: int, now: float) -> Admission:
    result = limiter.check("t1", limits, tokens, now)
    assert isinstance(result, Admission), result
    return result


def deny(limiter: Limiter, limits: TenantLimits, tokens: int, now: float) -> Denied:
    result = limiter.check("t1", limits, tokens, now)
    assert isinstance(result, Denied), result
    return result


def test_no_limits_admit_everything() -> None:
    limiter = Limiter()
    for _ in range(1000):
        admit(limiter, TenantLimits(), 10**9, 0.0)
    assert limiter.in_flight("t1") == 1000


def test_requests_bucket_bursts_one_minute_then_refills_linearly() -> None:
    limiter = Limiter()
    for _ in range(60):
        admit(limiter, RPM, 1, 0.0)
    denied = deny(limiter, RPM, 1, 0.0)
    assert denied.reason is DenyReason.REQUESTS_PER_MINUTE
    assert denied.retry_after_seconds == pytest.approx(1.0)
    assert deny(limiter, RPM, 1, 0.5).retry_after_seconds == pytest.approx(0.5)
    admit(limiter, RPM, 1, 1.0)
    deny(limiter, RPM, 1, 1.0)


def test_bucket_refill_is_capped_at_capacity() -> None:
    bucket = TokenBucket(60, now=0.0)
    bucket.take(60)
    assert bucket.wait(30, now=30.0) == 0.0
    assert bucket.level == pytest.approx(30.0)
    assert bucket.wait(61, now=10_000.0) == pytest.approx(1.0)
    assert bucket.level == 60.0


def test_clock_stepping_back_mints_nothing() -> None:
    bucket = TokenBucket(60, now=100.0)
    bucket.take(60)
    bucket.refill(40.0)
    assert bucket.level == 0.0
    bucket.refill(101.0)
    assert bucket.level == pytest.approx(1.0)


def test_tokens_are_charged_up_front_and_refunded_on_settle() -> None:
    limiter = Limiter()
    first = admit(limiter, TPM, 600, 0.0)
    denied = deny(limiter, TPM, 600, 0.0)
    assert denied.reason is DenyReason.TOKENS_PER_MINUTE
    # 200 tokens short at 1000/60 per second: 12 s.
    assert denied.retry_after_seconds == pytest.approx(12.0)
    limiter.settle(first, actual_tokens=100, now=0.0)
    admit(limiter, TPM, 600, 0.0)
    deny(limiter, TPM, 400, 0.0)
    admit(limiter, TPM, 300, 0.0)


def test_settling_more_than_charged_puts_the_tenant_in_debt() -> None:
    limiter = Limiter()
    admission = admit(limiter, TPM, 500, 0.0)
    limiter.settle(admission, actual_tokens=1500, now=0.0)
    # Level is 1000 - 1500 = -500: 600 tokens need 1100 more, 66 s.
    assert deny(limiter, TPM, 600, 0.0).retry_after_seconds == pytest.approx(66.0)


def test_a_denial_charges_nothing() -> None:
    limiter = Limiter()
    both = TenantLimits(requests_per_minute=2, tokens_per_minute=1000)
    admit(limiter, both, 900, 0.0)
    for _ in range(5):
        deny(limiter, both, 900, 0.0)  # tokens short; the request bucket must not drain
    limiter.settle(admit(limiter, both, 100, 0.0), 100, 0.0)
    assert deny(limiter, both, 1, 0.0).reason is DenyReason.REQUESTS_PER_MINUTE


def test_the_longest_wait_names_the_reason() -> None:
    limiter = Limiter()
    both = TenantLimits(requests_per_minute=2, tokens_per_minute=60)
    admit(limiter, both, 60, 0.0)
    admit(limiter, both, 0, 0.0)
    denied = deny(limiter, both, 60, 0.0)  # requests: 30 s; tokens: 60 s
    assert (denied.reason, denied.retry_after_seconds) == (DenyReason.TOKENS_PER_MINUTE, 60.0)
    denied = deny(limiter, both, 1, 29.5)  # requests: 0.5 s; tokens: none
    assert denied.reason is DenyReason.REQUESTS_PER_MINUTE
    assert denied.retry_after_seconds == pytest.approx(0.5)


def test_concurrency_cap_and_release() -> None:
    limiter = Limiter()
    limits = TenantLimits(max_concurrent=2)
    first = admit(limiter, limits, 1, 0.0)
    admit(limiter, limits, 1, 0.0)
    denied = deny(limiter, limits, 1, 0.0)
    assert denied.reason is DenyReason.MAX_CONCURRENT
    assert denied.retry_after_seconds is not None and denied.retry_after_seconds > 0
    limiter.settle(first, 0, 1.0)
    admit(limiter, limits, 1, 1.0)


def test_too_long_requests_are_refused_permanently() -> None:
    limiter = Limiter()
    denied = deny(limiter, TenantLimits(max_total_tokens=4096), 4097, 0.0)
    assert denied.reason is DenyReason.MAX_TOTAL_TOKENS
    assert denied.retry_after_seconds is None
    assert "lower max_tokens" in denied.message
    admit(limiter, TenantLimits(max_total_tokens=4096), 4096, 0.0)


def test_a_request_larger_than_a_minute_of_tokens_can_never_pass() -> None:
    denied = deny(Limiter(), TPM, 1001, 0.0)
    assert (denied.reason, denied.retry_after_seconds) == (DenyReason.TOKENS_PER_MINUTE, None)


def test_settling_twice_is_refused() -> None:
    limiter = Limiter()
    admission = admit(limiter, TenantLimits(max_concurrent=1), 1, 0.0)
    limiter.settle(admission, 1, 0.0)
    with pytest.raises(AlreadySettled, match="settle once"):
        limiter.settle(admission, 1, 0.0)
    assert limiter.in_flight("t1") == 0


def test_tenants_do_not_share_buckets() -> None:
    limiter = Limiter()
    for _ in range(60):
        admit(limiter, RPM, 1, 0.0)
    assert isinstance(limiter.check("t2", RPM, 1, 0.0), Admission)


def test_changing_limits_keeps_what_was_used() -> None:
    limiter = Limiter()
    for _ in range(60):
        admit(limiter, RPM, 1, 0.0)
    doubled = TenantLimits(requests_per_minute=120)
    assert deny(limiter, doubled, 1, 0.0).retry_after_seconds == pytest.approx(0.5)
    for _ in range(10):
        admit(limiter, doubled, 1, 5.0)  # 5 s at 2/s refilled 10
    deny(limiter, doubled, 1, 5.0)
    admit(limiter, TenantLimits(), 1, 5.0)  # lifted: unlimited at once


def test_newly_limited_tenant_starts_with_a_full_bucket() -> None:
    limiter = Limiter()
    admit(limiter, TenantLimits(), 1, 0.0)
    for _ in range(60):
        admit(limiter, RPM, 1, 1.0)
    deny(limiter, RPM, 1, 1.0)


@given(
    per_minute=st.integers(min_value=1, max_value=120),
    gaps=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=400),
)
def test_admissions_never_exceed_burst_plus_refill(per_minute: int, gaps: list[float]) -> None:
    limiter, limits, now = Limiter(), TenantLimits(requests_per_minute=per_minute), 0.0
    admitted = 0
    for gap in gaps:
        now += gap
        result = limiter.check("t1", limits, 1, now)
        if isinstance(result, Admission):
            admitted += 1
        else:
            # The promised wait is exact: waiting it out admits the request.
            assert result.retry_after_seconds is not None
            retry = limiter.check("t1", limits, 1, now + result.retry_after_seconds + 1e-9)
            assert isinstance(retry, Admission)
            admitted += 1
            now += result.retry_after_seconds + 1e-9
        assert admitted <= per_minute + per_minute * now / 60 + 1e-6


@pytest.mark.parametrize("field", [r.value for r in DenyReason])
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field}=0 must be at least 1"):
        TenantLimits(**{field: 0})
