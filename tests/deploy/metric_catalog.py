"""The metric series loraplex and vLLM export, read statically from their source.

A metric is a call to a prometheus_client class (``Counter(...)``, or vLLM's
``self._counter_cls(...)``) whose name is a string literal. The series a
scrape shows follow from its type: a counter ``x`` is scraped as ``x_total``,
a histogram as ``x_bucket``, ``x_sum`` and ``x_count``.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from deploy_paths import REPO

# Constructor spellings, by metric type (vLLM picks its classes through attributes).
_KINDS = {
    "Counter": "counter",
    "_counter_cls": "counter",
    "Gauge": "gauge",
    "_gauge_cls": "gauge",
    "Histogram": "histogram",
    "_histogram_cls": "histogram",
    "Summary": "summary",
}

LORAPLEX_SOURCES = tuple(sorted((REPO / "server").rglob("*.py")))
"""Every module of ``server``: the gateway's metrics, and the resolver's (served on each
engine's /metrics), wherever a refactor puts them."""

PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
"""Series Prometheus itself writes for every target."""


@dataclass(frozen=True)
class Declared:
    """One metric declared in source."""

    name: str
    """The name given to the constructor."""
    kind: str
    """counter, gauge, histogram or summary."""
    labels: frozenset[str] | None
    """Label names when they are a literal list in the source; None when computed."""
    source: Path
    """The file that declares it."""


def declared_in(path: Path) -> list[Declared]:
    """Every metric ``path`` declares with a literal name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        kind = _KINDS.get(_callee(node.func))
        name = _argument(node, 0, "name")
        if kind and isinstance(name, ast.Constant) and isinstance(name.value, str):
            found.append(Declared(name.value, kind, _labels(node), path))
    return found


def _callee(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _argument(call: ast.Call, position: int, keyword: str) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == keyword:
            return kw.value
    return call.args[position] if len(call.args) > position else None


def _labels(call: ast.Call) -> frozenset[str] | None:
    node = _argument(call, 2, "labelnames")
    if node is None:
        return frozenset()
    if isinstance(node, ast.List | ast.Tuple) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        return frozenset(e.value for e in node.elts)  # type: ignore[attr-defined]
    return None


def series(metric: Declared) -> set[str]:
    """The series names a scrape shows for ``metric`` (prometheus_client's rules)."""
    if metric.kind == "counter":
        return {metric.name.removesuffix("_total") + "_total"}
    if metric.kind == "histogram":
        return {metric.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    if metric.kind == "summary":
        return {metric.name, metric.name + "_sum", metric.name + "_count"}
    return {metric.name}


def vllm_metrics_dir() -> Path:
    """``vllm/v1/metrics`` of the installed vLLM, found without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise AssertionError("vLLM is not installed in this environment (make install)")
    return Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics"


def loraplex_metrics() -> list[Declared]:
    return [m for path in LORAPLEX_SOURCES if path.exists() for m in declared_in(path)]


def vllm_metrics() -> list[Declared]:
    return [m for path in sorted(vllm_metrics_dir().glob("*.py")) for m in declared_in(path)]


def exported_series(metrics: list[Declared]) -> dict[str, Declared]:
    """Series name -> the metric behind it."""
    return {name: m for m in metrics for name in series(m)}
