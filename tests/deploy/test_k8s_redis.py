"""The optional in-cluster Redis (deploy/k8s/redis/) renders, validates and fits every overlay.

It is applied beside an overlay (``kubectl apply -k deploy/k8s/redis -n loraplex``), so
each check combines its objects with each overlay's: the gateways' Redis URL names its
Service, and only gateways may reach it.
"""

from __future__ import annotations

import urllib.parse

import pytest
from deploy_paths import K8S
from manifests import (
    Obj,
    assert_only_gateways_reach,
    component,
    containers,
    key,
    named,
    pod_labels,
    pod_spec,
    render,
    schema_errors,
    service_problems,
    workloads,
)


@pytest.fixture(scope="module")
def redis() -> list[Obj]:
    return render(K8S / "redis")


def test_redis_validates_against_the_kubernetes_schema(redis: list[Obj]) -> None:
    errors = schema_errors(redis)
    assert not errors, "\n".join(errors)


def test_redis_service_selects_its_pod_and_names_its_port(redis: list[Obj]) -> None:
    assert component(redis, "redis"), "no Redis workload"
    problems = service_problems(redis)
    assert not problems, "\n".join(problems)


def test_the_gateways_redis_url_names_the_redis_service(fleet: list[Obj], redis: list[Obj]) -> None:
    """The placeholder the overlays ship works as it is once Redis is applied beside them."""
    url = urllib.parse.urlsplit(named(fleet, "Secret", "loraplex-redis")["stringData"]["url"])
    service = named(redis, "Service", str(url.hostname))
    assert url.port in {p["port"] for p in service["spec"]["ports"]}


def test_only_gateways_reach_redis(fleet: list[Obj], redis: list[Obj]) -> None:
    """Limits are the gateways' business: no engine, worker or job may read or reset them."""
    (workload,) = component(redis, "redis")
    assert_only_gateways_reach(fleet + redis, pod_labels(workload))


def test_redis_runs_unprivileged_from_a_pinned_image(redis: list[Obj]) -> None:
    for workload in workloads(redis):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True, key(workload)
        assert isinstance(spec["securityContext"]["runAsUser"], int), key(workload)
        assert spec.get("automountServiceAccountToken") is False, key(workload)
        for container in containers(spec):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            assert ":" in container["image"] and not container["image"].endswith(":latest")
