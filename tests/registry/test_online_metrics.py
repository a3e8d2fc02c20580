"""Online metrics of a version (registry/online_metrics.py) on SQLite and PostgreSQL: the
thumbs-up share from each completion's latest feedback, error rate and latency from the
usage book, recorded as eval results that gates use, and the evals over versions
(registry/eval_history.py)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from registry_testdata import BASE_NAME

from registry import (
    Actor,
    AdapterVersion,
    Gate,
    GateFailed,
    NotFound,
    Registry,
    Tenant,
    latency,
)
from registry.captures import CaptureStore, FeedbackInput, NewCompletion
from registry.eval_history import eval_history
from registry.models import utcnow
from registry.online_metrics import online_metrics, record_online_metrics

USER = Actor("key:7")


def _served(registry: Registry, tenant_id: int, n: int, version: int = 1) -> str:
    completion_id = f"chatcmpl-{n}"
    CaptureStore(registry).save([NewCompletion(
        tenant_id=tenant_id, completion_id=completion_id, model="bot", adapter="bot",
        version=version, route="production", user=None, metadata={}, stream=False,
        prompt_tokens=3, completion_tokens=1, created_at=utcnow(),
        request={"model": "bot", "messages": [{"role": "user", "content": f"q {n}"}]},
        response={"choices": [{"message": {"role": "assistant", "content": f"a {n}"}}]},
    )])  # fmt: skip
    return completion_id


def _feedback(registry: Registry, tenant_id: int, completion_id: str, **given: object) -> None:
    CaptureStore(registry).add_feedback(tenant_id, completion_id, FeedbackInput(**given))  # type: ignore[arg-type]


def _metrics(registry: Registry, tenant_id: int, version: int = 1) -> dict[str, tuple[float, int]]:
    measured = online_metrics(registry, tenant_id, "bot", version)
    return {s.metric: (s.value, s.sample_count or 0) for s in measured.scores}


def test_thumbs_up_share_counts_each_completions_latest_feedback(
    registry: Registry, tenant: Tenant, bot_v1: AdapterVersion, adapters: dict[str, Path]
) -> None:
    assert tenant.id is not None
    registry.push_adapter(tenant.id, "bot", adapters["v2"], BASE_NAME, USER)
    ids = [_served(registry, tenant.id, n) for n in range(5)]
    _feedback(registry, tenant.id, ids[0], thumbs="up")
    _feedback(registry, tenant.id, ids[0], thumbs="down")  # changed their mind: down
    _feedback(registry, tenant.id, ids[1], thumbs="down")
    _feedback(registry, tenant.id, ids[1], thumbs="up")  # up
    _feedback(registry, tenant.id, ids[2], rating=5)  # up
    _feedback(registry, tenant.id, ids[3], rating=2)  # down
    _feedback(registry, tenant.id, ids[4], note="slow")  # rates nothing
    other = _served(registry, tenant.id, 99, version=2)
    _feedback(registry, tenant.id, other, thumbs="down")  # another version's
    assert _metrics(registry, tenant.id)["thumbs_up_share"] == (0.5, 4)
    assert _metrics(registry, tenant.id, version=2)["thumbs_up_share"] == (0.0, 1)


def test_errors_and_latency_come_from_the_usage_book(
    registry: Registry, tenant: Tenant, bot_v1: AdapterVersion
) -> None:
    assert tenant.id is not None
    assert _metrics(registry, tenant.id) == {}  # nothing served yet: nothing to say
    fast = [0] * latency.SIZE
    fast[latency.bucket(0.07)] = 90
    slow = [0] * latency.SIZE
    slow[latency.bucket(0.7)] = 8
    today = utcnow().date()
    registry.record_usage(tenant.id, "bot", 1, requests=60, errors=1, latency_seconds=3.0,
                          latency_count=50, latency_buckets=fast[:], day=today)  # fmt: skip
    registry.record_usage(tenant.id, "bot", 1, requests=40, errors=2, latency_seconds=9.0,
                          latency_count=48, latency_buckets=slow, day=today)  # fmt: skip
    yesterday = today - dt.timedelta(days=1)
    registry.record_usage(tenant.id, "bot", 1, requests=10, errors=3, latency_seconds=1.0,
                          latency_count=2, latency_buckets=fast, day=yesterday)  # fmt: skip
    registry.record_usage(tenant.id, "bot", 2, requests=500, errors=500)  # another version
    [row] = [u for u in registry.usage(tenant.id, today) if u.version == 1]
    assert row.latency_buckets is not None and sum(row.latency_buckets) == 98  # added up
    since = dt.datetime.combine(today, dt.time(), dt.UTC)
    measured = {s.metric: s for s in online_metrics(registry, tenant.id, "bot", 1, since).scores}
    assert (measured["error_rate"].value, measured["error_rate"].sample_count) == (0.03, 100)
    assert measured["latency_mean_s"].value == pytest.approx(12.0 / 98)
    assert measured["latency_mean_s"].sample_count == 98
    # 90 of 98 in the 0.05-0.1 s bucket: the 95th percentile lies in the 0.5-1 s one.
    assert 0.5 < measured["latency_p95_s"].value <= 1.0
    assert "thumbs_up_share" not in measured  # no feedback: not measured
    whole_life = online_metrics(registry, tenant.id, "bot", 1, since - dt.timedelta(days=2))
    assert {s.metric: s.sample_count for s in whole_life.scores}["error_rate"] == 110


def test_recorded_metrics_are_audited_eval_results_that_gates_use(
    registry: Registry, tenant: Tenant, bot_v1: AdapterVersion
) -> None:
    assert tenant.id is not None
    registry.set_gates(tenant.id, "bot", [
        Gate("online", "error_rate", min_value=0.05, higher_is_better=False),
        Gate("online", "thumbs_up_share", min_value=0.5),
    ], USER)  # fmt: skip
    with pytest.raises(GateFailed, match="no eval result"):
        registry.promote(tenant.id, "bot", 1, USER)
    registry.record_usage(tenant.id, "bot", 1, requests=10, errors=2)
    _feedback(registry, tenant.id, _served(registry, tenant.id, 1), thumbs="up")
    recorded = record_online_metrics(registry, tenant.id, "bot", 1, USER)
    assert {s.metric for s in recorded.scores} == {"error_rate", "thumbs_up_share"}
    results = registry.eval_results(tenant.id, "bot", 1)
    assert {(r.suite, r.metric, r.value, r.sample_count) for r in results} == {
        ("online", "error_rate", 0.2, 10),
        ("online", "thumbs_up_share", 1.0, 1),
    }
    events = registry.audit_log(tenant_id=tenant.id, action="adapter.eval")
    assert len(events) == 2 and all(e.actor == USER.name for e in events)
    with pytest.raises(GateFailed, match=r"online/error_rate: 0\.2 misses the maximum 0\.05"):
        registry.promote(tenant.id, "bot", 1, USER)
    registry.record_usage(tenant.id, "bot", 1, requests=190)
    record_online_metrics(registry, tenant.id, "bot", 1, USER)  # 2 in 200: 1 %
    registry.promote(tenant.id, "bot", 1, USER)


def test_evals_over_versions_show_the_latest_of_each_metric_and_the_aliases(
    registry: Registry, tenant: Tenant, bot_v1: AdapterVersion, adapters: dict[str, Path]
) -> None:
    assert tenant.id is not None
    registry.push_adapter(tenant.id, "bot", adapters["v2"], BASE_NAME, USER)
    registry.add_eval_result(tenant.id, "bot", 1, "qa", "exact_match", 0.4, USER)
    registry.add_eval_result(tenant.id, "bot", 1, "qa", "exact_match", 0.6, USER, sample_count=50)
    registry.add_eval_result(tenant.id, "bot", 2, "online", "error_rate", 0.01, USER)
    registry.promote(tenant.id, "bot", 1, USER)
    registry.canary(tenant.id, "bot", 2, 0.1, USER)
    first, second = eval_history(registry, tenant.id, "bot")
    assert (first.version, first.aliases, second.aliases) == (1, ("production",), ("canary",))
    assert [(r.suite, r.metric, r.value, r.sample_count) for r in first.latest] == [
        ("qa", "exact_match", 0.6, 50)
    ]
    assert second.to_json()["evals"][0]["metric"] == "error_rate"


def test_a_foreign_adapter_is_answered_like_an_unknown_one(
    registry: Registry, tenant: Tenant, bot_v1: AdapterVersion
) -> None:
    other = registry.create_tenant("globex", USER).id
    assert other is not None
    messages = []
    for name in ("bot", "nope"):
        for call in (
            lambda n: online_metrics(registry, other, n, 1),
            lambda n: record_online_metrics(registry, other, n, 1, USER),
            lambda n: eval_history(registry, other, n),
        ):
            with pytest.raises(NotFound) as caught:
                call(name)
            messages.append(str(caught.value).replace(name, "X"))
    assert messages[:3] == messages[3:]


def test_a_quantile_is_interpolated_within_its_bucket() -> None:
    counts = [0] * latency.SIZE
    assert latency.quantile(counts, 0.95) is None
    counts[latency.bucket(0.3)] = 10  # the 0.25-0.5 s bucket
    assert latency.quantile(counts, 0.5) == pytest.approx(0.375)
    counts[-1] = 90  # above the last bound: the last bound, a lower bound
    assert latency.quantile(counts, 0.95) == latency.BOUNDS[-1]
    assert latency.bucket(latency.BOUNDS[0]) == 0 and latency.bucket(1e9) == latency.SIZE - 1
