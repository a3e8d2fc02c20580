"""Session fixtures for end-to-end tests: the demo base and one running `loraplex serve`.

The real vLLM CPU engine takes about a minute to start, so one gateway+engine
pair serves the whole session; tests that kill engines start their own.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI

from registry import TENANT_SCOPE, Actor, LocalBlobStore, Registry
from server.dev.fleet import Fleet, FleetConfig
from tests.e2e.serving import REPO, ServeProcess, free_port, wait_gone

OPERATOR = Actor("test:operator", admin=True)

# float32 so greedy outputs can be compared with PEFT's; little KV cache: two engines may run.
ENGINE_ARGS = [
    "--engine-dtype",
    "float32",
    "--engine-memory-fraction",
    "0.08",
    "--engine-max-model-len",
    "1024",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def demo_base() -> Path:
    from training.demo_base import build_demo_base

    # For quick local iterations an already built model can stand in (CI never sets this).
    if os.environ.get("LORAPLEX_E2E_BASE"):
        return Path(os.environ["LORAPLEX_E2E_BASE"])
    # The same cache `make demo` uses, so CI builds it once.
    return build_demo_base(REPO / ".loraplex" / "demo-base")


@pytest.fixture(scope="session")
def engine_key() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture(scope="session")
def engine_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def gateway(
    demo_base: Path, engine_key: str, engine_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    serve = ServeProcess(
        tmp_path_factory.mktemp("serve"),
        args=["--base-model", str(demo_base), "--engine-port", str(engine_port), *ENGINE_ARGS],
        env={"LORAPLEX_ENGINE_API_KEY": engine_key},
    ).start()
    try:
        serve.wait_ready()
        yield serve
    finally:
        children = serve.all_descendants()
        assert serve.stop(), f"loraplex serve did not shut down cleanly:\n{serve.log_tail()}"
        leftovers = wait_gone(children)
        assert not leftovers, f"engine processes outlived loraplex serve: {leftovers}"


@pytest.fixture(scope="session")
def registry(gateway: ServeProcess) -> Iterator[Registry]:
    """The gateway's own registry (SQLite under its home), opened beside it as an operator would."""
    reg = Registry(
        f"sqlite:///{gateway.home / 'registry.db'}", LocalBlobStore(gateway.home / "blobs")
    )
    yield reg
    reg.close()


@dataclass(frozen=True)
class TenantKeys:
    name: str
    tenant_id: int
    key: str


def make_tenant(registry: Registry, name: str) -> TenantKeys:
    tenant = registry.create_tenant(name, OPERATOR)
    assert tenant.id is not None
    _, key = registry.create_api_key(tenant.id, TENANT_SCOPE, OPERATOR)
    return TenantKeys(name, tenant.id, key)


@pytest.fixture(scope="session")
def acme(registry: Registry) -> TenantKeys:
    return make_tenant(registry, "acme")


@pytest.fixture(scope="session")
def client(gateway: ServeProcess, acme: TenantKeys) -> OpenAI:
    return OpenAI(base_url=gateway.url + "/v1", api_key=acme.key, max_retries=0)


@pytest.fixture(scope="session")
def base_name(demo_base: Path) -> str:
    return demo_base.name


@pytest.fixture(scope="session")
def small_base() -> Path:
    """The fleet's second base (``make fleet`` builds the same one)."""
    from server.dev.fleet import SMALL_BASE
    from training.demo_base import build_demo_base

    return build_demo_base(REPO / ".loraplex" / "demo-base-small", SMALL_BASE)


@contextlib.contextmanager
def running_fleet(config: FleetConfig) -> Iterator[Fleet]:
    """The loopback fleet of ``config``, started, then stopped and its database dropped."""
    from tests.registry.registry_testdata import drop_database

    fleet = Fleet(config)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()
        drop_database(fleet.database_url)
