"""The Grafana dashboard queries only metrics that loraplex or vLLM export (read from source)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from deploy_paths import COMPOSE, DASHBOARD
from metric_catalog import (
    PROMETHEUS_SERIES,
    Declared,
    exported_series,
    loraplex_metrics,
    vllm_metrics,
)
from promql import dashboard_queries, grafana_query, label_names, metric_names

# Labels Prometheus adds to every series, and the histogram bucket label.
TARGET_LABELS = frozenset({"instance", "job", "le"})


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


@pytest.fixture(scope="module")
def exported() -> dict[str, Declared]:
    return exported_series(loraplex_metrics() + vllm_metrics())


def test_every_queried_metric_is_exported(
    dashboard: dict[str, Any], exported: dict[str, Declared]
) -> None:
    unknown = [
        f"{where}: {name}"
        for where, expr in dashboard_queries(dashboard)
        for name in sorted(metric_names(expr))
        if name not in exported and name not in PROMETHEUS_SERIES
    ]
    assert not unknown, "the dashboard queries metrics nothing exports:\n" + "\n".join(unknown)


def test_labels_on_loraplex_metrics_exist(
    dashboard: dict[str, Any], exported: dict[str, Declared]
) -> None:
    """Where every metric of a query declares literal labels, the query uses only those."""
    wrong = []
    for where, expr in dashboard_queries(dashboard):
        metrics = [exported[n] for n in metric_names(expr) if n in exported]
        if not metrics or any(m.labels is None for m in metrics):
            continue  # vLLM computes its label lists; nothing static to compare with
        known = set(TARGET_LABELS).union(*(m.labels or () for m in metrics))
        wrong += [f"{where}: {label}" for label in sorted(label_names(expr) - known)]
    assert not wrong, "the dashboard uses labels its metrics do not have:\n" + "\n".join(wrong)


def test_dashboard_covers_the_operations_views(dashboard: dict[str, Any]) -> None:
    """Per-tenant and per-adapter traffic, latency, errors, adapter cache, engine health."""
    used = [
        (metric_names(expr), label_names(expr), expr) for _, expr in dashboard_queries(dashboard)
    ]

    def uses(metric: str, *labels: str, text: str = "") -> bool:
        return any(metric in m and set(labels) <= ls and text in e for m, ls, e in used)

    wanted = {
        "traffic per tenant": uses("loraplex_requests_total", "tenant"),
        "traffic per adapter": uses("loraplex_requests_total", "tenant", "adapter"),
        "latency per tenant": uses("loraplex_request_duration_seconds_bucket", "le", "tenant"),
        "latency per adapter": uses("loraplex_request_duration_seconds_bucket", "le", "adapter"),
        "server errors": uses("loraplex_requests_total", "status", text='"5.."'),
        "upstream errors": uses("loraplex_upstream_errors_total"),
        "adapter cache hits": uses("loraplex_adapter_cache_hits_total"),
        "adapter loads": uses("loraplex_adapter_cache_misses_total"),
        "engine health": uses("loraplex_engine_up"),
        "engine queue": uses("vllm:num_requests_waiting"),
    }
    missing = [view for view, ok in wanted.items() if not ok]
    assert not missing, f"the dashboard lacks: {', '.join(missing)}"


def test_compose_provisions_this_dashboard() -> None:
    provider = (COMPOSE / "grafana" / "provisioning" / "dashboards" / "loraplex.yaml").read_text()
    compose = (COMPOSE / "compose.yaml").read_text()
    assert "path: /var/lib/grafana/dashboards" in provider
    assert f"../{DASHBOARD.parent.name}:/var/lib/grafana/dashboards:ro" in compose


# -- the readers the checks above rely on -------------------------------------------


def test_metric_names_skip_functions_labels_numbers_and_variables() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, tenant) (rate(a_bucket{tenant=~"$tenant"}'
        "[$__rate_interval]))) / on (instance) group_left b_total * 1e9 > bool $threshold"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert label_names(expr) == {"le", "tenant", "instance"}
    assert metric_names('vllm:num_requests_running{model_name="x"}') == {
        "vllm:num_requests_running"
    }


def test_grafana_variable_queries_yield_their_expression() -> None:
    assert grafana_query('label_values(m_total{tenant=~"$t"}, adapter)') == 'm_total{tenant=~"$t"}'
    assert grafana_query("label_values(tenant)") == ""
    assert grafana_query("up") == "up"


def test_catalog_names_series_as_a_scrape_shows_them(exported: dict[str, Declared]) -> None:
    assert exported["loraplex_requests_total"].kind == "counter"
    assert "loraplex_requests" not in exported  # counters are scraped with _total
    assert exported["loraplex_requests_total"].labels == {
        "route", "tenant", "adapter", "version", "status"
    }  # fmt: skip
    assert {"vllm:num_requests_running", "vllm:generation_tokens_total"} <= exported.keys()
    assert "vllm:e2e_request_latency_seconds_bucket" in exported
    assert "vllm:e2e_request_latency_seconds" not in exported  # histograms: _bucket/_sum/_count
    assert "loraplex_adapter_cache_hits_total" in exported  # the engines' resolver
