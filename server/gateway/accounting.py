"""Accounting for inference requests: admission against the tenant's limits before, and
for each finished request its limits settled, its usage booked for billing and its
metrics recorded, in one place.
"""

from __future__ import annotations

import math
import time
from typing import Any

import orjson

import router
from server.errors import APIError
from server.gateway.metrics import Metrics
from server.gateway.proxy import Outcome
from server.gateway.resolution import Route
from server.gateway.shared_limits import LimitsUnavailable, SharedAdmission, SharedLimiter
from server.gateway.tenancy import Caller, UsageBook

CHARS_PER_TOKEN_ESTIMATE = 3
"""Prompt tokens are charged up front as characters / 3 (settled with the engine's count)."""

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
_ROUTE_LABELS = {CHAT: "chat_completions", COMPLETIONS: "completions"}
_STATUS_LABELS = {200: "200"}
CLIENT_GONE = "client_disconnected"
"""``Outcome.error`` of a request whose client disconnected (``proxy``, ``fair_queue``)."""

Admitted = router.Admission | SharedAdmission
"""An admitted request: counted in this gateway's memory, or in Redis with every gateway's."""


def estimate_tokens(body: dict[str, Any], settings_max: int) -> int:
    """Upper-bound-ish token ask of a request, for the token bucket and length cap."""
    completion = body.get("max_completion_tokens") or body.get("max_tokens") or settings_max
    return estimate_prompt_tokens(body) + int(completion) * int(body.get("n", 1))


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """The prompt's share of ``estimate_tokens``."""
    prompt = body.get("messages", body.get("prompt", ""))
    text = prompt if isinstance(prompt, str) else orjson.dumps(prompt)
    return math.ceil(len(text) / CHARS_PER_TOKEN_ESTIMATE)


def failed(outcome: Outcome) -> bool:
    """Whether a request counts as an error of what served it, in the usage book.

    A 5xx (the engine's, or the gateway's: no replica, queue full, timeout) and a stream
    the engine broke off count. A 4xx does not, the engine's included: it refuses the
    client's request (a prompt over the context, a bad parameter), which says nothing
    about the version, and counting it would let one client's bad requests fail a gate.
    Nor does a client that went away.
    """
    if outcome.error == CLIENT_GONE:
        return False
    return outcome.status >= 500 or (outcome.status < 400 and bool(outcome.error))


class Accounting:
    """Owns the tenant limiters, the usage book and the request metrics."""

    def __init__(
        self,
        limiter: router.Limiter,
        usage: UsageBook,
        metrics: Metrics,
        max_tokens_limit: int,
        shared: SharedLimiter | None = None,
    ) -> None:
        self.limiter = limiter
        """This gateway's own counts: all of them, or (with ``shared``) its fallback."""
        self.shared = shared
        """Counts every gateway shares (Redis), when a Redis URL is set."""
        self.usage = usage
        self.metrics = metrics
        self.max_tokens_limit = max_tokens_limit

    async def admit(
        self, caller: Caller, limits: router.TenantLimits, body: dict[str, Any]
    ) -> Admitted:
        """Charge the request's estimated tokens, or raise the 429 (400, 503) APIError."""
        asked = estimate_tokens(body, self.max_tokens_limit)
        tenant = str(caller.tenant_id)
        decision: Admitted | router.Denied
        if self.shared is None:
            decision = self.limiter.check(tenant, limits, asked, time.monotonic())
        else:
            try:
                decision = await self.shared.check(tenant, limits, asked)
            except LimitsUnavailable as exc:
                retry = {"Retry-After": str(exc.retry_after)}
                raise APIError(503, str(exc), code="limits_unavailable", headers=retry) from None
        if not isinstance(decision, router.Denied):
            return decision
        if decision.retry_after_seconds is None:
            raise APIError(400, decision.message, code=f"{decision.reason.value}_exceeded")
        retry_after = max(1, math.ceil(decision.retry_after_seconds))
        raise APIError(
            429,
            decision.message,
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry_after)},
        )

    def finished(
        self,
        path: str,
        route: Route,
        caller: Caller,
        admission: Admitted,
        outcome: Outcome,
        started: float,
    ) -> None:
        """Account for one request: limits settled, usage booked, metrics recorded."""
        usage = outcome.usage
        used = usage.prompt_tokens + usage.completion_tokens if usage else admission.tokens_charged
        self._settle(admission, used)
        end = outcome.finished_at or time.perf_counter()
        self.usage.add(
            caller.tenant_id,
            route.adapter_label,
            route.version.number if route.version else 0,
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
            error=failed(outcome),
            seconds=end - started if outcome.status == 200 and not outcome.error else None,
        )
        self.record(path, route, outcome, started)

    def release(self, admission: Admitted) -> None:
        """End an admitted request that was never sent (its model did not resolve): its
        concurrency slot returned and its token estimate refunded; the request counts."""
        self._settle(admission, 0)

    def _settle(self, admission: Admitted, used: int) -> None:
        if isinstance(admission, SharedAdmission):
            assert self.shared is not None  # only a shared limiter makes shared admissions
            self.shared.settle(admission, used)
        else:
            self.limiter.settle(admission, used, time.monotonic())

    def record(self, path: str, route: Route, outcome: Outcome, started: float) -> None:
        m = self.metrics
        label = _ROUTE_LABELS.get(path) or path.removeprefix("/v1/").replace("/", "_")
        status = outcome.error or _STATUS_LABELS.get(outcome.status) or str(outcome.status or 500)
        tenant, adapter, version = route.tenant, route.adapter_label, route.version_label
        m.requests_of(label, tenant, adapter, version, status).inc()
        end = outcome.finished_at or time.perf_counter()
        m.latency_of(label, tenant, adapter).observe(end - started)
        if outcome.first_byte_at is not None:
            m.ttft_of(tenant, adapter).observe(outcome.first_byte_at - started)
        if outcome.usage is not None:
            m.tokens_of(tenant, adapter, version, "prompt").inc(outcome.usage.prompt_tokens)
            m.tokens_of(tenant, adapter, version, "completion").inc(outcome.usage.completion_tokens)
