"""Prometheus metrics, all named ``loraplex_*``.

Each gateway app owns its own ``CollectorRegistry`` so tests and embedded uses
can create several apps in one process.
"""

from __future__ import annotations

import contextlib
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# `*_created` series double the exposition size and no dashboard of ours reads them.
disable_created_metrics()

# Buckets from sub-millisecond (gateway overhead) to minutes (long generations).
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
)  # fmt: skip

_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

M = TypeVar("M", Counter, Histogram)


class Children(Generic[M]):
    """A metric's labelled children, kept once made.

    ``metric.labels(...)`` validates and locks on every call; the hot path asks
    for the same few label sets again and again, so a dict lookup answers it.
    Only for metrics whose series are never removed (a removed child would
    live on here, detached).
    """

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._made: dict[tuple[str, ...], M] = {}

    def __call__(self, *labels: str) -> M:
        child = self._made.get(labels)
        if child is None:
            child = self._made[labels] = self.metric.labels(*labels)
        return child


class Metrics:
    """The gateway's metrics; labels are bounded (routes, tenants, adapters, engines)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraplex_requests",
            "Inference requests by route, tenant, adapter, version and HTTP status.",
            ["route", "tenant", "adapter", "version", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "loraplex_request_duration_seconds",
            "Time from request to last byte, by route, tenant and adapter.",
            ["route", "tenant", "adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "Time from request to the first streamed event, by tenant and adapter.",
            ["tenant", "adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "loraplex_tokens",
            "Tokens reported by the engines, by kind (prompt or completion).",
            ["tenant", "adapter", "version", "kind"],
            registry=r,
        )
        self._add_engine_metrics()
        self._add_capture_metrics()
        self._add_shadow_metrics()
        self._add_routing_metrics()
        self._add_process_metrics()
        self._add_queue_metrics()

        # Per-request series, through their children caches.
        self.requests_of = Children(self.requests)
        self.latency_of = Children(self.latency)
        self.ttft_of = Children(self.ttft)
        self.tokens_of = Children(self.tokens)
        self.engine_requests_of = Children(self.engine_requests)
        self.upstream_errors_of = Children(self.upstream_errors)
        self.queue_wait_of = Children(self.queue_wait)
        self.captured_of = Children(self.captured)
        self.capture_dropped_of = Children(self.capture_dropped)

    def _add_process_metrics(self) -> None:
        r = self.registry
        self.in_flight = Gauge(
            "loraplex_in_flight_requests", "Requests being proxied now.", registry=r
        )
        self.limit_store_errors = Counter(
            "loraplex_limit_store_errors",
            "Failed calls to the Redis holding shared tenant limits, by operation "
            "(admit, settle, renew); each admit failure fell back or answered 503.",
            ["operation"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "loraplex_event_loop_lag_seconds",
            "How late the event loop ran a timer: a delay every request in flight shared.",
            buckets=_LAG_BUCKETS,
            registry=r,
        )

    def _add_engine_metrics(self) -> None:
        r = self.registry
        self.upstream_errors = Counter(
            "loraplex_upstream_errors",
            "Failed engine requests by engine and reason (connect, timeout, protocol, status).",
            ["engine", "reason"],
            registry=r,
        )
        self.engine_requests = Counter(
            "loraplex_engine_requests",
            "Requests the gateway sent to each engine replica.",
            ["engine"],
            registry=r,
        )
        self.engine_up = Gauge(
            "loraplex_engine_up", "1 when the engine passes health checks.", ["engine"], registry=r
        )
        self.engine_restarts = Gauge(
            "loraplex_engine_restarts",
            "Times the supervisor restarted this engine.",
            ["engine"],
            registry=r,
        )

    def _add_queue_metrics(self) -> None:
        r = self.registry
        self.queue_wait = Histogram(
            "loraplex_queue_wait_seconds",
            "Time requests waited at the gateway's fair queue (their tenant's in-flight token "
            "budget or the engines' in-flight tokens full; 0 for most), by tenant.",
            ["tenant"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queued = Gauge(
            "loraplex_queued_requests",
            "Requests waiting at the gateway's fair queue now, by tenant.",
            ["tenant"],
            registry=r,
        )

    def _add_capture_metrics(self) -> None:
        r = self.registry
        self.captured = Counter(
            "loraplex_captured",
            "Chat completions stored for their tenant (capture on, `store`), by tenant.",
            ["tenant"],
            registry=r,
        )
        self.capture_dropped = Counter(
            "loraplex_capture_dropped",
            "Chat completions to be stored that were not, by tenant and reason (queue_full, "
            "too_large, unreadable, duplicate, write_failed); their answers were not affected.",
            ["tenant", "reason"],
            registry=r,
        )

    def _add_shadow_metrics(self) -> None:
        r = self.registry
        self.shadow_copies = Counter(
            "loraplex_shadow_copies",
            "Copies of production requests for a shadow candidate, by tenant and outcome "
            "(answered, failed, busy: dropped as the engines or this gateway's shadow slots "
            "were full, unreadable: production's answer could not be read, book_full, "
            "write_failed: compared but not recorded).",
            ["tenant", "outcome"],
            registry=r,
        )
        self.shadow_tokens = Counter(
            "loraplex_shadow_tokens",
            "Tokens the shadow copies used, by tenant and kind (prompt or completion); "
            "charged to no tenant's limits.",
            ["tenant", "kind"],
            registry=r,
        )
        self.shadow_copies_of = Children(self.shadow_copies)
        self.shadow_tokens_of = Children(self.shadow_tokens)

    def _add_routing_metrics(self) -> None:
        r = self.registry
        self.routing_decisions = Counter(
            "loraplex_routing_decisions",
            "Routed-model decisions, by tenant, routed model, reason (rule, classifier, "
            "default, fallback: the classifier gave no usable label), label and target.",
            ["tenant", "routed_model", "reason", "label", "target"],
            registry=r,
        )
        self.routing_classifier_seconds = Histogram(
            "loraplex_routing_classifier_seconds",
            "Time a routed model's classifier decision took, by outcome (answered, cached: "
            "an identical prompt's label reused, failed: the default was used).",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.routing_decisions_of = Children(self.routing_decisions)
        self.routing_classifier_seconds_of = Children(self.routing_classifier_seconds)

    def forget_engine(self, engine: str) -> None:
        """Drop a departed engine's series, so dashboards stop showing it as down."""
        for gauge in (self.engine_up, self.engine_restarts):
            with contextlib.suppress(KeyError):
                gauge.remove(engine)
