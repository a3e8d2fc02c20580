"""Live prompt drift: the prompts routed to adapters, sketched and scored off the hot path.

A request routed to an adapter leaves one thing behind: its prompt text (the last user
message of a chat, the prompt of a completion: ``registry.drift.prompts_of``), cut to
``registry.drift.MEASURED_CHARS``, appended to a bounded list per (tenant, adapter). Past
``MAX_PENDING`` prompts (or ``MAX_PENDING_CHARS`` characters) until the next flush, prompts
are dropped and counted (``loraplex_drift_prompts_dropped_total``). Every ``interval``
seconds a background task, in a worker thread, sketches each list (hashing is the costly
part), merges the sketch into the adapter's live sketch of the day in the registry, and
checks the adapter's drift: ``loraplex_adapter_drift{tenant,adapter}`` is set to the score
(absent while unknown), and a crossing of the threshold is an audit event
(``registry.drift.DriftStore.check``).

This runs whether or not the tenant captures its completions: one mechanism, so the
numbers mean the same for every tenant, and nothing of the prompt is kept beyond the
hashed sketch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from registry import Actor
from registry.drift import (
    DEFAULT_DAYS,
    MEASURED_CHARS,
    DriftReport,
    DriftStore,
    prompts_of,
    sketch_prompts,
)
from server.gateway.metrics import Children, Metrics
from server.gateway.resolution import Route

log = logging.getLogger("loraplex.drift")

MAX_PENDING = 4096
"""Prompts kept between two flushes, at most; more are dropped (and counted)."""
MAX_PENDING_CHARS = 8 << 20
"""Characters kept between two flushes, at most."""
PURGE_EVERY = 3600.0
"""Seconds between deletions of live sketches older than any report reads."""
ACTOR = Actor("gateway:drift")
"""Who the audit log says noticed a drift."""

DriftKey = tuple[int, str, str]
"""(tenant id, tenant name, adapter name)."""


@dataclass(frozen=True)
class DriftMetrics:
    """The drift series, on the gateway's metrics registry."""

    score: Gauge
    dropped: Children[Counter]

    @classmethod
    def on(cls, metrics: Metrics) -> DriftMetrics:
        score = Gauge(
            "loraplex_adapter_drift",
            "How far an adapter's prompts of the last 7 days are from its production "
            "version's training prompts (0: the same, 1: disjoint), by tenant and adapter; "
            "absent while unknown (no reference, too few prompts).",
            ["tenant", "adapter"],
            registry=metrics.registry,
        )
        dropped = Counter(
            "loraplex_drift_prompts_dropped",
            "Prompts left out of the drift sketches because too many waited for the next "
            "flush, by tenant; their requests were not affected.",
            ["tenant"],
            registry=metrics.registry,
        )
        return cls(score, Children(dropped))


class DriftBook:
    """The prompts routed to adapters since the last flush, and the loop that scores them."""

    def __init__(
        self,
        store: DriftStore,
        metrics: Metrics,
        threshold: float,
        days: int = DEFAULT_DAYS,
    ) -> None:
        self.store = store
        self.metrics = DriftMetrics.on(metrics)
        self.threshold = threshold
        self.days = days
        self._pending: defaultdict[DriftKey, list[str]] = defaultdict(list)
        self._count = 0
        self._chars = 0

    def offer(self, tenant_id: int, route: Route, body: dict[str, Any]) -> None:
        """Keep the request's prompt if it went to an adapter (the hot path: no hashing)."""
        if route.version is None:
            return
        for text in prompts_of(body):
            kept = text[:MEASURED_CHARS]
            if self._count >= MAX_PENDING or self._chars + len(kept) > MAX_PENDING_CHARS:
                self.metrics.dropped(route.tenant).inc()
                continue
            self._pending[(tenant_id, route.tenant, route.version.adapter)].append(kept)
            self._count += 1
            self._chars += len(kept)

    @property
    def pending(self) -> int:
        """Prompts waiting for the next flush."""
        return self._count

    async def flush(self) -> None:
        """Sketch and store what is pending, then score each adapter it was for."""
        pending, self._pending = self._pending, defaultdict(list)
        self._count = self._chars = 0
        if not pending:
            return
        # One worker-thread hop per flush: hashing and the registry writes stay off the loop.
        reports = await asyncio.to_thread(self._write, pending)
        for (_, tenant, adapter), report in reports.items():
            self._export(tenant, adapter, report)

    def _write(self, pending: dict[DriftKey, list[str]]) -> dict[DriftKey, DriftReport]:
        reports = {}
        for key, texts in pending.items():
            tenant_id, _, adapter = key
            try:
                self.store.add_live(tenant_id, adapter, sketch_prompts(texts))
                reports[key] = self.store.check(
                    tenant_id, adapter, ACTOR, self.days, self.threshold
                )
            except Exception:  # a sketch is a sample: losing one flush's is no harm
                log.exception("could not record the drift of %s; its prompts are dropped", key)
        return reports

    def _export(self, tenant: str, adapter: str, report: DriftReport) -> None:
        if report.score is None:
            with contextlib.suppress(KeyError):
                self.metrics.score.remove(tenant, adapter)
        else:
            self.metrics.score.labels(tenant, adapter).set(report.score)

    async def run(self, interval: float) -> None:
        """Flush every ``interval`` seconds, and purge old live sketches every
        ``PURGE_EVERY``, for the gateway's lifetime."""
        next_purge = 0.0
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush()
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + PURGE_EVERY
                    await asyncio.to_thread(self.store.purge)
            except Exception:  # this loop is every adapter's drift: it must not end
                log.exception("drift flush failed; trying again in %.0f s", interval)
