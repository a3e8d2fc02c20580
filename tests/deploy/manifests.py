"""Rendering the kustomize overlays and looking things up in the rendered objects."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from deploy_paths import venv_tool

Obj = dict[str, Any]
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


def render(kustomization_dir: Path) -> list[Obj]:
    """The objects ``kubectl kustomize`` (kustomize v5, built into kubectl) renders."""
    done = subprocess.run(
        [str(venv_tool("kubectl")), "kustomize", str(kustomization_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise AssertionError(f"kustomize failed for {kustomization_dir}:\n{done.stderr}")
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


def key(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def named(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    if len(found) != 1:
        raise AssertionError(f"expected one {kind}/{name}, found {len(found)}")
    return found[0]


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def workloads(objects: list[Obj]) -> list[Obj]:
    return [o for o in objects if o["kind"] in WORKLOADS]


def containers(spec: Obj) -> Iterator[Obj]:
    """Init containers, then containers, of one pod spec."""
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def component(objects: list[Obj], name: str) -> list[Obj]:
    """The workloads whose pods carry ``app.kubernetes.io/component: name``."""
    return [
        w for w in workloads(objects) if pod_labels(w).get("app.kubernetes.io/component") == name
    ]


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics: matchLabels and matchExpressions, ANDed.

    A bare mapping (a Service's ``spec.selector``) is treated as matchLabels.
    """
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    for name, value in selector.get("matchLabels", {}).items():
        if labels.get(name) != value:
            return False
    return all(_expression(e, labels) for e in selector.get("matchExpressions", []))


def _expression(expression: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    label, op = expression["key"], expression["operator"]
    values = expression.get("values", [])
    if op == "In":
        return labels.get(label) in values
    if op == "NotIn":
        return labels.get(label) not in values
    if op == "Exists":
        return label in labels
    if op == "DoesNotExist":
        return label not in labels
    raise AssertionError(f"unknown selector operator {op!r}")


def env_names(container: Obj, objects: list[Obj]) -> set[str]:
    """Every variable a container gets, from ``env`` and from ConfigMaps/Secrets in ``envFrom``."""
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if ref in source:
                obj = named(objects, kind, source[ref]["name"])
                names |= set(obj.get("data", {})) | set(obj.get("stringData", {}))
    return names
