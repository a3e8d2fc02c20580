"""Rendering the Helm chart (deploy/helm/loraplex) and comparing its objects with the
kustomize overlays'.

Rendering uses ``helm-python-sdk`` (a dev extra): Helm v4's own Go engine, bundled in the
wheel as a shared library, since PyPI ships no helm binary for Linux. It renders exactly
what ``helm template`` / ``helm install`` would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from deploy_paths import DEPLOY
from manifests import Obj, key

CHART = DEPLOY / "helm" / "loraplex"
RELEASE = "loraplex"
"""The release name the README installs with: the chart then names objects as kustomize does."""
NAMESPACE = "loraplex"
"""The overlays' namespace."""
SETUPS = sorted(p.stem.removeprefix("values-") for p in CHART.glob("values-*.yaml"))
"""Each values file's setup (``values-small.yaml`` -> ``small``), named like its overlay."""

HELM_LABELS = {
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/version",
    "helm.sh/chart",
}
"""Labels only the chart sets (the release's): selectors never use them."""


def helm() -> Any:
    """The helm-python-sdk module; fails (never skips) the test when it is missing."""
    try:
        import helm_python
    except ImportError as exc:
        raise AssertionError(
            f"cannot render {CHART}: helm-python-sdk is not installed ({exc}); "
            "run `make install` (it is in pyproject's dev extras)"
        ) from None
    return helm_python


def setup_values(setup: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / f"values-{setup}.yaml").read_text())
    return values


def render_chart(values: dict[str, Any], chart: Path = CHART) -> list[Obj]:
    """The objects ``helm template RELEASE CHART -n NAMESPACE -f VALUES`` renders (hooks
    included: the migration Job is one)."""
    with helm().Chart.load(chart) as loaded:
        manifests = loaded.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        obj
        for path, text in sorted(manifests.items())
        if path.endswith((".yaml", ".yml"))
        for obj in yaml.safe_load_all(text)
        if obj
    ]


def lint_errors(values: dict[str, Any]) -> list[str]:
    """What ``helm lint --strict`` finds (warnings included) with ``values``."""
    report = helm().lint(CHART, values, strict=True, namespace=NAMESPACE)
    messages = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    return messages + list(report.get("errors") or [])


def label_problems(chart_obj: Obj, kustomize_obj: Obj) -> list[str]:
    """Labels kustomize puts on an object that the chart leaves off, or sets otherwise."""
    ours = chart_obj["metadata"].get("labels", {})
    return [
        f"{key(chart_obj)}: label {name}={value!r}, chart has {ours.get(name)!r}"
        for name, value in kustomize_obj["metadata"].get("labels", {}).items()
        if ours.get(name) != value
    ]


def comparable(obj: Obj, *, from_chart: bool) -> Any:
    """``obj`` without what may differ by design: its metadata labels (compared by
    :func:`label_problems`), the chart's Helm annotations (hooks, resource policy) and
    its pods' config checksums. Lists of named items (containers, env, volumes, ports)
    become maps by name: their order means nothing to Kubernetes, and kustomize's
    strategic merge reorders them."""
    metadata = {k: v for k, v in obj["metadata"].items() if k != "labels"}
    if from_chart:
        annotations = {
            k: v for k, v in metadata.pop("annotations", {}).items() if not k.startswith("helm.sh/")
        }
        metadata |= {"annotations": annotations} if annotations else {}
    body = _by_name({**obj, "metadata": metadata})
    template = body.get("spec", {}).get("template", {}).get("metadata", {})
    if from_chart and "annotations" in template:
        annotations = template.pop("annotations").items()
        kept = {k: v for k, v in annotations if not k.startswith("checksum/")}
        template |= {"annotations": kept} if kept else {}
    return body


def _by_name(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _by_name(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_by_name(v) for v in value]
        if items and all(isinstance(i, dict) and "name" in i for i in items):
            return {f"[{i['name']}]": i for i in items}
        return items
    return value


def differences(chart_value: Any, kustomize_value: Any, path: str = "") -> list[str]:
    """Where two comparable objects differ, as ``path: chart X, kustomize Y`` lines."""
    if isinstance(chart_value, dict) and isinstance(kustomize_value, dict):
        found = []
        for name in sorted(chart_value.keys() | kustomize_value.keys()):
            inner = f"{path}{name}" if name.startswith("[") or not path else f"{path}.{name}"
            found += differences(chart_value.get(name), kustomize_value.get(name), inner)
        return found
    if chart_value != kustomize_value:
        return [f"{path}: chart {chart_value!r}, kustomize {kustomize_value!r}"]
    return []
