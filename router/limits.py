"""Per-tenant noisy-neighbour limits: rates, concurrency and request length.

Token buckets hold one minute's allowance and refill continuously. A request is
charged up front for the most tokens it can use (prompt + max completion), and
settled with the engine's actual count when it ends, so a tenant cannot
overshoot its tokens/minute by asking for long completions in parallel, and is
not punished for completions that stop early.

``Limiter`` is pure: the clock comes in as ``now`` (seconds, monotonic). It
takes no locks: it is meant for one asyncio loop, where no call awaits, so
calls never interleave. Threads would need a lock around each call.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

SECONDS_PER_MINUTE = 60.0
CONCURRENCY_RETRY_AFTER = 1.0
"""Seconds suggested to a tenant at its concurrency cap: no clock says when a slot frees."""


class AlreadySettled(RuntimeError):
    """An admission was settled twice; settle each admitted request exactly once."""


class DenyReason(StrEnum):
    """Which limit refused a request (named like the tenant's limit field)."""

    MAX_TOTAL_TOKENS = "max_total_tokens"
    MAX_CONCURRENT = "max_concurrent"
    REQUESTS_PER_MINUTE = "requests_per_minute"
    TOKENS_PER_MINUTE = "tokens_per_minute"


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """A tenant's limits; None means unlimited."""

    requests_per_minute: int | None = None
    """Requests admitted per minute (bursts up to one minute's worth)."""
    tokens_per_minute: int | None = None
    """Prompt + completion tokens per minute, charged up front and settled afterwards."""
    max_concurrent: int | None = None
    """Requests in flight at once."""
    max_total_tokens: int | None = None
    """Largest prompt + max completion length one request may ask for."""

    def __post_init__(self) -> None:
        for name in DenyReason:
            value = getattr(self, name.value)
            if value is not None and value < 1:
                raise ValueError(
                    f"limit {name.value}={value} must be at least 1, or None (unlimited)"
                )


@dataclass(frozen=True, slots=True)
class Denied:
    """A refusal: answer 429 with ``Retry-After``, or 400 when retrying cannot help."""

    reason: DenyReason
    """The limit that refused the request."""
    retry_after_seconds: float | None
    """Seconds until the same request would pass; None if it never will (too long)."""
    message: str
    """What happened and what to do, for the client."""


class Admission:
    """An admitted request; hand it back to ``Limiter.settle`` exactly once when it ends."""

    __slots__ = ("_state", "settled", "tenant", "tokens_charged")

    def __init__(self, tenant: str, tokens_charged: int, state: _TenantState) -> None:
        self.tenant = tenant
        self.tokens_charged = tokens_charged
        self.settled = False
        self._state = state


class TokenBucket:
    """Holds up to one minute's allowance and refills it continuously."""

    __slots__ = ("capacity", "level", "rate", "updated_at")

    def __init__(self, per_minute: int, now: float, level: float | None = None) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / SECONDS_PER_MINUTE
        self.level = self.capacity if level is None else min(level, self.capacity)
        self.updated_at = now

    def refill(self, now: float) -> None:
        # A clock that steps back must not mint tokens or move updated_at backwards.
        elapsed = max(0.0, now - self.updated_at)
        self.level = min(self.capacity, self.level + elapsed * self.rate)
        self.updated_at = max(self.updated_at, now)

    def wait(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` can be taken (0.0 if now)."""
        self.refill(now)
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float) -> None:
        """Take ``amount`` (call ``wait`` first); the level may go below zero on settling."""
        self.level -= amount

    def give(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


class _TenantState:
    __slots__ = ("in_flight", "limits", "requests", "tokens")

    def __init__(self, limits: TenantLimits, now: float) -> None:
        self.limits = TenantLimits()
        self.requests: TokenBucket | None = None
        self.tokens: TokenBucket | None = None
        self.in_flight = 0
        self.apply(limits, now)

    def apply(self, limits: TenantLimits, now: float) -> None:
        """Switch to new limits, keeping what the tenant has already used."""
        if limits == self.limits:
            return
        self.requests = _resized(self.requests, limits.requests_per_minute, now)
        self.tokens = _resized(self.tokens, limits.tokens_per_minute, now)
        self.limits = limits


def _resized(bucket: TokenBucket | None, per_minute: int | None, now: float) -> TokenBucket | None:
    if per_minute is None:
        return None
    if bucket is None:
        return TokenBucket(per_minute, now)
    bucket.refill(now)
    return TokenBucket(per_minute, now, level=bucket.level)


class Limiter:
    """Every tenant's limit state."""

    def __init__(self) -> None:
        self._tenants: dict[str, _TenantState] = {}

    def check(
        self, tenant: str, limits: TenantLimits, total_tokens: int, now: float
    ) -> Admission | Denied:
        """Admit a request asking for up to ``total_tokens`` (prompt + max completion), or deny.

        ``limits`` are the tenant's current limits (from the registry); a change
        takes effect here, keeping the usage already counted. A denial charges nothing.
        """
        state = self._state(tenant, limits, now)
        denied = permanent_denial(limits, total_tokens) or _temporary_denial(
            state, total_tokens, now
        )
        if denied is not None:
            return denied
        if state.requests is not None:
            state.requests.take(1)
        if state.tokens is not None:
            state.tokens.take(total_tokens)
        state.in_flight += 1
        return Admission(tenant, total_tokens, state)

    def settle(self, admission: Admission, actual_tokens: int, now: float) -> None:
        """End an admitted request that used ``actual_tokens``: refund or charge the difference."""
        if admission.settled:
            raise AlreadySettled(
                f"admission for tenant {admission.tenant!r} was already settled; "
                "settle once, in a finally block"
            )
        admission.settled = True
        state = admission._state
        state.in_flight -= 1
        if state.tokens is None:
            return
        state.tokens.refill(now)
        surplus = admission.tokens_charged - actual_tokens
        if surplus >= 0:
            state.tokens.give(surplus)
        else:
            state.tokens.take(-surplus)  # the engine counted more than asked: owe it

    def in_flight(self, tenant: str) -> int:
        """Admitted, unsettled requests of ``tenant``."""
        state = self._tenants.get(tenant)
        return 0 if state is None else state.in_flight

    def _state(self, tenant: str, limits: TenantLimits, now: float) -> _TenantState:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _TenantState(limits, now)
        else:
            state.apply(limits, now)
        return state


def permanent_denial(limits: TenantLimits, total_tokens: int) -> Denied | None:
    """The denial of a request longer than a limit, which no count can ever admit; None
    if it fits. Retrying is pointless, so it carries no Retry-After."""
    for limit, reason, advice in (
        (limits.max_total_tokens, DenyReason.MAX_TOTAL_TOKENS, "shorten the prompt or lower"),
        (limits.tokens_per_minute, DenyReason.TOKENS_PER_MINUTE, "lower"),
    ):
        if limit is not None and total_tokens > limit:
            return Denied(
                reason,
                None,
                f"prompt + max completion is {total_tokens} tokens, over your {reason.value} "
                f"limit of {limit}: {advice} max_tokens",
            )
    return None


def _temporary_denial(state: _TenantState, total_tokens: int, now: float) -> Denied | None:
    limits = state.limits
    if limits.max_concurrent is not None and state.in_flight >= limits.max_concurrent:
        return at_concurrency_cap(state.in_flight, limits.max_concurrent)
    waits = [
        (bucket.wait(amount, now), reason)
        for bucket, amount, reason in (
            (state.requests, 1, DenyReason.REQUESTS_PER_MINUTE),
            (state.tokens, total_tokens, DenyReason.TOKENS_PER_MINUTE),
        )
        if bucket is not None
    ]
    wait, reason = max(waits, default=(0.0, DenyReason.REQUESTS_PER_MINUTE))
    if wait <= 0.0:
        return None
    return over_rate(reason, wait)


def at_concurrency_cap(in_flight: int, limit: int) -> Denied:
    """The denial of a tenant with ``in_flight`` requests at its concurrency ``limit``."""
    return Denied(
        DenyReason.MAX_CONCURRENT,
        CONCURRENCY_RETRY_AFTER,
        f"{in_flight} of your requests are in flight, your limit is {limit}: "
        "wait for one to finish",
    )


def over_rate(reason: DenyReason, wait: float) -> Denied:
    """The denial of a request a rate bucket can admit in ``wait`` seconds."""
    return Denied(
        reason, wait, f"over your {reason.value.replace('_', ' ')} limit; retry in {wait:.1f} s"
    )
