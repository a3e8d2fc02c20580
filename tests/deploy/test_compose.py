"""The compose stack hangs together. Structure only: no Docker engine runs here."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from deploy_paths import COMPOSE
from engine_contract import known_variables, missing_flags, required_engine_env

Service = dict[str, Any]
ENGINE_PORT = 8000
GATEWAY_PORT = 8000


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Service]:
    found: dict[str, Service] = compose["services"]
    return found


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    return data


def engines(services: dict[str, Service]) -> dict[str, Service]:
    return {name: s for name, s in services.items() if name.startswith("engine-")}


def uses_loraplex_image(service: Service) -> bool:
    return bool(service["image"].startswith("${LORAPLEX_IMAGE"))


def engine_script(service: Service) -> str:
    assert service["entrypoint"] == ["sh", "-c"]
    script: str = service["command"][0]
    return script


def test_the_stack_has_every_role(services: dict[str, Service]) -> None:
    roles = {"gateway", "worker", "postgres", "s3", "prometheus", "grafana"}
    assert roles <= set(services)
    assert len(engines(services)) >= 2


def test_every_service_has_an_image_and_loraplex_ones_a_command(
    services: dict[str, Service],
) -> None:
    """The image's default command is the gateway, so every other role must say its own."""
    for name, service in services.items():
        assert service.get("image"), name
        if uses_loraplex_image(service):
            assert service.get("command"), f"{name} would run `loraplex serve`"
    assert services["gateway"]["command"] == ["serve"]
    assert services["worker"]["command"] == ["worker"]


def test_references_resolve(compose: dict[str, Any], services: dict[str, Service]) -> None:
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name
        assert set(service.get("networks", [])) <= set(compose["networks"]), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name} mounts missing {source}"
            elif not source.startswith("$"):
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"


def test_published_host_ports_are_unique(services: dict[str, Service]) -> None:
    published = [
        str(port).rsplit(":", 1)[0].split(":")[-1]
        for service in services.values()
        for port in service.get("ports", [])
    ]
    assert len(published) == len(set(published)), published
    assert {n for n, s in services.items() if s.get("ports")} == {
        "gateway",
        "prometheus",
        "grafana",
    }


def test_prometheus_scrapes_the_gateway_and_every_engine(
    services: dict[str, Service], prometheus: dict[str, Any]
) -> None:
    targets = {
        job["job_name"]: {t for c in job["static_configs"] for t in c["targets"]}
        for job in prometheus["scrape_configs"]
    }
    assert targets["loraplex-gateway"] == {f"gateway:{GATEWAY_PORT}"}
    assert targets["loraplex-engine"] == {f"{name}:{ENGINE_PORT}" for name in engines(services)}
    for target in set().union(*targets.values()):
        host = target.split(":")[0]
        assert set(services[host]["networks"]) & set(services["prometheus"]["networks"]), host


def test_the_gateway_calls_every_engine(services: dict[str, Service]) -> None:
    urls = services["gateway"]["environment"]["LORAPLEX_ENGINE_URLS"].split(",")
    assert set(urls) == {f"http://{name}:{ENGINE_PORT}" for name in engines(services)}
    assert services["gateway"]["environment"]["LORAPLEX_PORT"] == str(GATEWAY_PORT)
    for service in engines(services).values():
        assert f"--port {ENGINE_PORT}" in engine_script(service)


def test_only_the_gateway_and_prometheus_reach_engines(
    compose: dict[str, Any], services: dict[str, Service]
) -> None:
    """Any container on a network with an engine can call it: list who can."""
    engine_networks = set().union(*(set(s["networks"]) for s in engines(services).values()))
    neighbours = {
        name
        for name, service in services.items()
        if not name.startswith("engine-") and set(service.get("networks", [])) & engine_networks
    }
    # Engines need the registry and the blob store (which call nobody) and read the
    # fingerprint bootstrap writes before they start.
    assert neighbours == {"gateway", "prometheus", "postgres", "s3", "bootstrap"}
    assert all(compose["networks"][n].get("internal") for n in engine_networks)


def test_engines_match_the_supervisors_command_and_environment(
    services: dict[str, Service],
) -> None:
    for name, service in engines(services).items():
        script = engine_script(service)
        assert not missing_flags(script), name
        have = set(service["environment"]) | set(re.findall(r"\b([A-Z_]+)=", script))
        assert required_engine_env() <= have, name


def test_container_variables_are_escaped_from_compose(services: dict[str, Service]) -> None:
    """Compose substitutes `$X` itself; variables meant for the container's shell need `$$`."""
    for service in engines(services).values():
        unescaped = re.findall(r"(?<!\$)\$(?!\$)[({]?\w+", engine_script(service))
        assert not unescaped, unescaped


def test_every_loraplex_variable_is_a_real_setting(services: dict[str, Service]) -> None:
    used = {v for s in services.values() for v in s.get("environment", {})}
    assert {v for v in used if v.startswith("LORAPLEX_")} <= known_variables()


def test_env_example_lists_every_required_variable() -> None:
    required = set(re.findall(r"\$\{(\w+):\?", (COMPOSE / "compose.yaml").read_text()))
    example = (COMPOSE / ".env.example").read_text()
    listed = set(re.findall(r"^(\w+)=", example, re.MULTILINE))
    assert required and required <= listed, required - listed
