"""The compose stack hangs together. Structure only: no Docker engine runs here.

Every service is read, those of the optional ``second-base`` profile too: a base is a
bootstrap (registers it), its engines and its worker, tied by the served name and the
model directory they share.
"""

from __future__ import annotations

import re
from itertools import combinations
from typing import Any

import pytest
import yaml
from deploy_paths import COMPOSE
from engine_contract import known_variables, missing_flags, required_engine_env

from server.config import SettingsError, load_settings
from server.gateway.discovery import Discovery

Service = dict[str, Any]
ENGINE_PORT = 8000
GATEWAY_PORT = 8000
MODEL_DIR = "/models/base"
FINGERPRINT_DIR = "/run/loraplex"
BOOTSTRAP = ["sh", "/deploy/bootstrap.sh"]
# SOURCE:TARGET[:MODE], where SOURCE may be a ${VARIABLE:?message} holding colons itself.
SHORT_VOLUME = re.compile(r"(?P<source>\$\{[^}]*\}|[^:]+):(?P<target>[^:]+)(?::\w+)?")


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


def mounts(service: Service) -> dict[str, str]:
    """Container path -> host path or volume name, short and long syntax alike."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found[volume["target"]] = volume["source"]
        else:
            match = SHORT_VOLUME.fullmatch(volume)
            assert match, f"unreadable volume {volume!r}"
            found[match["target"]] = match["source"]
    return found


def aliases(service: Service, network: str) -> set[str]:
    """The aliases ``service`` answers to on ``network``, besides its own name."""
    networks = service.get("networks", [])
    if network not in networks:
        return set()
    settings = networks[network] if isinstance(networks, dict) else None
    return {*(settings or {}).get("aliases", [])}


def bootstraps(services: dict[str, Service]) -> dict[str, Service]:
    return {name: s for name, s in services.items() if s.get("entrypoint") == BOOTSTRAP}


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
        for source in mounts(service).values():
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


def resolves_to(services: dict[str, Service], client: str, name: str) -> set[str]:
    """The services whose address ``name`` resolves to from ``client``'s networks."""
    return {
        other
        for other, service in services.items()
        for network in services[client]["networks"]
        if (name == other and network in service.get("networks", []))
        or name in aliases(service, network)
    }


def test_prometheus_scrapes_the_gateway_and_every_engine(
    services: dict[str, Service], prometheus: dict[str, Any]
) -> None:
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    gateway = {t for c in jobs["loraplex-gateway"]["static_configs"] for t in c["targets"]}
    assert gateway == {f"gateway:{GATEWAY_PORT}"}
    assert resolves_to(services, "prometheus", "gateway") == {"gateway"}
    (lookup,) = jobs["loraplex-engine"]["dns_sd_configs"]
    assert lookup["type"] == "A" and lookup["port"] == ENGINE_PORT
    (name,) = lookup["names"]
    assert resolves_to(services, "prometheus", name) == set(engines(services))


def test_the_gateway_finds_every_engine_and_nothing_else(services: dict[str, Service]) -> None:
    """Of every base, the profile's too: the alias it resolves is on engines alone."""
    environment = services["gateway"]["environment"]
    assert "LORAPLEX_ENGINE_URLS" not in environment
    discovery = Discovery.parse(environment["LORAPLEX_ENGINE_DISCOVERY"])
    assert discovery.scheme == "dns" and discovery.port == ENGINE_PORT
    assert resolves_to(services, "gateway", discovery.target) == set(engines(services))
    assert environment["LORAPLEX_PORT"] == str(GATEWAY_PORT)
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
    # fingerprint their bootstrap writes before they start.
    assert neighbours == {"gateway", "prometheus", "postgres", "s3", *bootstraps(services)}
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


def interpolated(value: str, env: dict[str, str]) -> str:
    """``value`` as compose writes it into a container: ``${X:-default}`` and ``${X:?why}``
    from ``env`` (.env), ``$$`` as ``$``."""

    def substitute(match: re.Match[str]) -> str:
        name, op, rest = match["name"], match["op"], match["rest"] or ""
        if env.get(name):
            return env[name]
        assert op != ":?", f"{name} is required: {rest}"
        return rest if op == ":-" else ""

    text = re.sub(r"\$\{(?P<name>\w+)(?:(?P<op>:[-?])(?P<rest>[^}]*))?\}", substitute, value)
    return text.replace("$$", "$")


def test_every_loraplex_service_loads_its_settings(services: dict[str, Service]) -> None:
    """With .env.example's values (placeholders for its blanks), each loraplex service's
    environment passes the checks `loraplex` runs when it starts."""
    example = (COMPOSE / ".env.example").read_text()
    env = {
        name: value or "CHANGE-ME"
        for name, value in re.findall(r"^(\w+)=(.*)$", example, re.MULTILINE)
    }
    for name, service in services.items():
        if uses_loraplex_image(service):
            environment = {k: interpolated(str(v), env) for k, v in service["environment"].items()}
            try:
                load_settings(environ=environment)
            except SettingsError as exc:
                raise AssertionError(f"{name}: {exc}") from None


def test_env_example_lists_every_required_variable() -> None:
    required = set(re.findall(r"\$\{(\w+):\?", (COMPOSE / "compose.yaml").read_text()))
    example = (COMPOSE / ".env.example").read_text()
    listed = set(re.findall(r"^(\w+)=", example, re.MULTILINE))
    assert required and required <= listed, required - listed


def test_env_example_lists_every_variable_of_the_second_base(
    services: dict[str, Service],
) -> None:
    """Commented out, since the one-base stack needs none of them."""

    def variables(profiled: bool) -> set[str]:
        chosen = {n: s for n, s in services.items() if bool(s.get("profiles")) == profiled}
        return set(re.findall(r"\$\{(\w+)", yaml.safe_dump(chosen)))

    used = variables(profiled=True) - variables(profiled=False)
    example = (COMPOSE / ".env.example").read_text()
    listed = set(re.findall(r"^#? ?(\w+)=", example, re.MULTILINE))
    assert used and used <= listed, used - listed


def test_dependencies_run_whenever_their_dependents_do(services: dict[str, Service]) -> None:
    """A service with no profile always runs; one with profiles runs when one is on."""
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            needed = set(services[dependency].get("profiles", []))
            active = set(service.get("profiles", []))
            assert not needed or (active and active <= needed), f"{name} -> {dependency}"


def base_of(services: dict[str, Service], name: str) -> tuple[str, str]:
    """(served name, model directory on the host) of the base ``name`` registers, serves
    or trains on."""
    service = services[name]
    return service["environment"]["LORAPLEX_SERVED_MODEL_NAME"], mounts(service)[MODEL_DIR]


def test_each_engine_serves_the_base_its_bootstrap_registered(
    services: dict[str, Service],
) -> None:
    """Same name, same weights, and the fingerprint that bootstrap wrote for them."""
    for name, engine in engines(services).items():
        (bootstrap,) = set(engine["depends_on"]) & set(bootstraps(services))
        assert base_of(services, name) == base_of(services, bootstrap), name
        assert mounts(engine)[FINGERPRINT_DIR] == mounts(services[bootstrap])[FINGERPRINT_DIR]
        assert "$$LORAPLEX_SERVED_MODEL_NAME" in engine_script(engine)
        assert f"--model {MODEL_DIR}" in engine_script(engine)


def test_every_base_has_a_worker_and_a_name_of_its_own(services: dict[str, Service]) -> None:
    """A base without a worker leaves its fine-tuning jobs queued; two bases under one
    name get no traffic (the gateway cannot tell which base an engine serves)."""
    bases = {base_of(services, name): name for name in bootstraps(services)}
    workers = [n for n, s in services.items() if s.get("command") == ["worker"]]
    assert {base_of(services, name) for name in workers} == set(bases)
    for name in workers:
        assert services[name]["environment"]["LORAPLEX_BASE_MODEL"] == MODEL_DIR
    for one, other in combinations(bases, 2):
        assert one[0] != other[0] and one[1] != other[1], (bases[one], bases[other])
    for bootstrap in bootstraps(services).values():
        assert bootstrap["command"] == [MODEL_DIR, f"{FINGERPRINT_DIR}/base-fingerprint"]
