"""Online metrics of an adapter version: what its live traffic says, as eval results.

From capture, the thumbs-up share of the completions the version served: each
completion's latest feedback counts (as in ``dataset_sources``); its thumbs decide, else
a rating of 4-5 is up and 1-3 down; a note or a correction alone rates nothing. From the
usage book (every gateway counts every request it admitted): the share of requests that
failed on the server's side, and the mean and 95th-percentile latency of the answered
ones (the percentile from the book's coarse buckets, ``registry.latency``).

``record_online_metrics`` writes them as the version's eval results in suite ``online``,
with their sample counts, audit-logged like any eval result; promotion gates then use
them unchanged, e.g. ``online/error_rate`` with a maximum (``higher_is_better`` false)
or ``online/thumbs_up_share`` with a minimum. A metric with no samples is not written:
a gate on it fails with "no eval result" until there are some.

The window is the version's whole life unless ``since`` is given (adapters are never
deleted, so (tenant, adapter, version) names one version's traffic forever). Usage is
kept per UTC day, so the usage part of a window starts at the beginning of its first day.
A foreign adapter is answered exactly like an unknown one (``NotFound``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from registry import latency
from registry.captures import CaptureStore, CompletionQuery, Feedback
from registry.dataset_sources import GOOD_RATING
from registry.models import AdapterVersion, Usage
from registry.registry import Registry, Score
from registry.values import Actor

SUITE = "online"
THUMBS_UP_SHARE = "thumbs_up_share"
ERROR_RATE = "error_rate"
LATENCY_MEAN = "latency_mean_s"
LATENCY_P95 = "latency_p95_s"
PAGE = 500
"""Stored completions read per query while their feedback is counted."""


@dataclass(frozen=True)
class OnlineMetrics:
    """A version's online metrics over a window."""

    adapter: str
    version: int
    version_id: int
    since: dt.datetime | None
    """Where the window starts (None: the version's whole life)."""
    scores: tuple[Score, ...]
    """One per metric that had samples, in suite ``online``."""

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "adapter.online_metrics",
            "adapter": self.adapter,
            "version": self.version,
            "since": self.since.isoformat() if self.since else None,
            "metrics": {s.metric: {"value": s.value, "sample_count": s.sample_count}
                        for s in self.scores},
        }  # fmt: skip


@dataclass(frozen=True)
class _Traffic:
    """The usage book's counters of one version, summed over days."""

    requests: int
    errors: int
    latency_seconds: float
    latency_count: int
    buckets: list[int]


def online_metrics(
    registry: Registry,
    tenant_id: int,
    adapter: str,
    version: int,
    since: dt.datetime | None = None,
) -> OnlineMetrics:
    """The version's online metrics from ``since`` (default: its whole life) until now."""
    row = registry.get_version(tenant_id, adapter, version)
    assert row.id is not None  # a stored row always has its primary key
    with registry._read() as s:
        traffic = _traffic(s, tenant_id, adapter, version, since.date() if since else None)
    up, rated = _ratings(CaptureStore(registry), tenant_id, adapter, version, since)
    p95 = latency.quantile(traffic.buckets, 0.95)
    measured = [
        (THUMBS_UP_SHARE, up / rated if rated else None, rated),
        (ERROR_RATE, traffic.errors / traffic.requests if traffic.requests else None,
         traffic.requests),
        (LATENCY_MEAN, traffic.latency_seconds / traffic.latency_count
         if traffic.latency_count else None, traffic.latency_count),
        (LATENCY_P95, p95, sum(traffic.buckets)),
    ]  # fmt: skip
    scores = tuple(
        Score(SUITE, metric, value, sample_count=count)
        for metric, value, count in measured
        if value is not None and count
    )
    return OnlineMetrics(adapter, version, row.id, since, scores)


def record_online_metrics(
    registry: Registry,
    tenant_id: int,
    adapter: str,
    version: int,
    actor: Actor,
    since: dt.datetime | None = None,
) -> OnlineMetrics:
    """Measure the version's online metrics and store them as its eval results (one
    transaction, each audit-logged); those with no samples are left out."""
    measured = online_metrics(registry, tenant_id, adapter, version, since)
    if measured.scores:
        with registry._write() as s:
            row = s.get(AdapterVersion, measured.version_id)
            assert row is not None  # versions are never deleted
            for score in measured.scores:
                registry.add_eval_result_in(s, row, score, actor)
    return measured


def _traffic(
    s: Session, tenant_id: int, adapter: str, version: int, first: dt.date | None
) -> _Traffic:
    mine = (
        Usage.tenant_id == tenant_id,
        Usage.adapter == adapter,
        Usage.version == version,
        col(Usage.day) >= (first or dt.date.min),
    )
    sums = select(
        func.coalesce(func.sum(Usage.requests), 0),
        func.coalesce(func.sum(Usage.errors), 0),
        func.coalesce(func.sum(Usage.latency_seconds), 0.0),
        func.coalesce(func.sum(Usage.latency_count), 0),
    )
    requests, errors, seconds, count = s.exec(sums.where(*mine)).one()
    days = s.exec(select(Usage.latency_buckets).where(*mine))
    return _Traffic(int(requests), int(errors), float(seconds), int(count), latency.added(days))


def _ratings(
    captures: CaptureStore, tenant_id: int, adapter: str, version: int, since: dt.datetime | None
) -> tuple[int, int]:
    """(thumbs up, rated) over the completions the version served since ``since``."""
    up = rated = 0
    for feedback in _latest_feedback(captures, tenant_id, adapter, version, since):
        verdict = _thumb(feedback)
        if verdict is not None:
            rated += 1
            up += verdict
    return up, rated


def _latest_feedback(
    captures: CaptureStore, tenant_id: int, adapter: str, version: int, since: dt.datetime | None
) -> Iterator[Feedback]:
    after: str | None = None
    while True:
        query = CompletionQuery(
            adapter=adapter, version=version, created_after=since, after=after, limit=PAGE
        )
        rows = captures.list_completions(tenant_id, query)
        yield from captures.latest_feedback(tenant_id, rows).values()
        if len(rows) < PAGE:
            return
        after = rows[-1].completion_id


def _thumb(feedback: Feedback) -> bool | None:
    """Up (True), down (False), or no rating (None) in one feedback."""
    if feedback.thumbs is not None:
        return feedback.thumbs == "up"
    if feedback.rating is not None:
        return feedback.rating >= GOOD_RATING
    return None
