"""Rendering kustomize directories, looking things up in the rendered objects, and the
checks every rendered piece (an overlay, the optional Redis) gets alike."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from deploy_paths import venv_tool

Obj = dict[str, Any]
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
KUBERNETES_VERSION = "1.37.0"
CRDS = {"monitoring.coreos.com/v1/ServiceMonitor"}
"""Kinds the Kubernetes schemas lack (checked against their CRD's schema instead)."""


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
    """Every variable a container gets; raises for a ConfigMap, Secret or key that is missing."""
    return set(written_env(container, objects))


def written_env(container: Obj, objects: list[Obj]) -> dict[str, str]:
    """The variables a container gets, with the values the manifests write (Secrets'
    placeholders included), as the kubelet sets them: ``env`` over ``envFrom``, and a later
    ``envFrom`` source over an earlier one."""
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if ref in source:
                values |= _data(named(objects, kind, source[ref]["name"]))
    for env in container.get("env", []):
        if "value" in env:
            values[env["name"]] = env["value"]
            continue
        for kind, ref in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            if ref in env.get("valueFrom", {}):
                selector = env["valueFrom"][ref]
                values[env["name"]] = _data(named(objects, kind, selector["name"]))[selector["key"]]
    return values


def _data(obj: Obj) -> dict[str, str]:
    data: dict[str, str] = obj.get("data", {}) | obj.get("stringData", {})
    return data


def base_label(obj: Obj) -> str:
    """The base model a pod, claim or Service belongs to (``loraplex.dev/base``)."""
    labels = obj["metadata"].get("labels", {})
    if "template" in obj.get("spec", {}):
        labels = pod_labels(obj)
    base: str = labels["loraplex.dev/base"]
    return base


def claim_mounts(spec: Obj, container: Obj) -> dict[str, str]:
    """Persistent volume claim name -> where ``container`` mounts it."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in spec.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    return {
        claims[m["name"]]: m["mountPath"]
        for m in container.get("volumeMounts", [])
        if m["name"] in claims
    }


def ingress_policies(objects: list[Obj], labels: Mapping[str, str]) -> list[Obj]:
    """The NetworkPolicies that restrict ingress to pods labelled ``labels``."""
    return [
        p
        for p in of_kind(objects, "NetworkPolicy")
        if selects(p["spec"]["podSelector"], labels) and "Ingress" in p["spec"]["policyTypes"]
    ]


def admitted_components(objects: list[Obj], labels: Mapping[str, str]) -> set[str]:
    """The components, among ``objects``' workloads, whose pods may reach pods labelled
    ``labels`` (peers scoped to another namespace, such as Prometheus, left out)."""
    return {
        pod_labels(w)["app.kubernetes.io/component"]
        for w in workloads(objects)
        for p in ingress_policies(objects, labels)
        for rule in p["spec"].get("ingress", [])
        for peer in rule.get("from", [])
        if "namespaceSelector" not in peer and selects(peer["podSelector"], pod_labels(w))
    }


def api_kind(obj: Obj) -> str:
    return f"{obj['apiVersion']}/{obj['kind']}"


def schema_errors(objects: list[Obj]) -> list[str]:
    """Where ``objects`` (CRDs aside) break the Kubernetes schemas, strictly."""
    errors = []
    for obj in objects:
        if api_kind(obj) in CRDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{key(obj)}: {exc.message} at {'/'.join(map(str, exc.path))}")
    return errors


def service_problems(objects: list[Obj]) -> list[str]:
    """Services that select no pods, or target a port their pods do not name."""
    problems = []
    for service in of_kind(objects, "Service"):
        pods = [
            w for w in workloads(objects) if selects(service["spec"]["selector"], pod_labels(w))
        ]
        if not pods:
            problems.append(f"{key(service)} selects no pods")
        for workload in pods:
            ports = {
                p.get("name") for c in pod_spec(workload)["containers"] for p in c.get("ports", [])
            }
            problems += [
                f"{key(service)} -> {key(workload)}: no port {port['targetPort']}"
                for port in service["spec"]["ports"]
                if port["targetPort"] not in ports
            ]
    return problems


def assert_only_gateways_reach(objects: list[Obj], labels: dict[str, str]) -> None:
    """Among loraplex pods, the NetworkPolicies on pods labelled ``labels`` admit gateways
    alone, and every other rule is scoped to another namespace, never open to all."""
    policies = ingress_policies(objects, labels)
    assert policies, f"no NetworkPolicy restricts ingress to {labels}"
    assert admitted_components(objects, labels) == {"gateway"}
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{key(policy)} has a rule open to every source"
