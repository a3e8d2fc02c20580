"""``GET /v1/adapters/{name}/drift`` over HTTP, on SQLite and on PostgreSQL (the shared
``registry`` fixture): unknown drift with its reason, a score past the app's threshold
with the last check's state, bad ``days``, and a foreign adapter answered like an
unknown one."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from registry import Actor, Registry
from registry.drift import DriftStore, sketch_prompts
from server.api import drift_routes
from tests.registry.registry_testdata import build_adapter, build_tiny_base
from tests.server.api.conftest import client_for, tenant_with_key

ROOT = Actor("test-root", admin=True)
ON_TOPIC = [f"Where is the {noun}?" for noun in ("cat", "dog", "boat", "tree", "lamp")]
OFF_TOPIC = ["Explain the tax implications of exercising stock options before an IPO."]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("drift-routes")
    base = build_tiny_base(root / "tiny")
    return base, build_adapter(base, root / "v1", seed=1)


@pytest.fixture
def client(registry: Registry) -> TestClient:
    client = client_for(registry, drift_routes.routes)
    client.app.state.drift_threshold = 0.3  # type: ignore[attr-defined]
    return client


def test_drift_is_unknown_then_scored_and_checked(
    registry: Registry, client: TestClient, built: tuple[Path, Path]
) -> None:
    tenant_id, acme = tenant_with_key(registry, "acme")
    registry.register_base(built[0], "tiny", "r1", ROOT)
    version = registry.push_adapter(tenant_id, "bot", built[1], "tiny", ROOT)
    registry.promote(tenant_id, "bot", 1, ROOT)
    body = client.get("/v1/adapters/bot/drift", headers=acme).json()
    assert body["object"] == "adapter.drift" and body["score"] is None
    assert "no reference sketch" in body["reason"] and body["version"] == 1
    assert body["last_check"] is None and body["threshold"] == 0.3
    store = DriftStore(registry)
    assert version.id is not None
    store.set_reference(version.id, sketch_prompts(ON_TOPIC * 20))
    store.add_live(tenant_id, "bot", sketch_prompts(OFF_TOPIC * 30))
    store.check(tenant_id, "bot", ROOT, threshold=0.3)
    body = client.get("/v1/adapters/bot/drift", headers=acme).json()
    assert body["score"] > 0.3 and body["over_threshold"] and body["days"] == 7
    assert (body["live_prompts"], body["reference_prompts"]) == (30, 100)
    assert body["last_check"]["over_threshold"] and body["last_check"]["since"] is not None
    bad = client.get("/v1/adapters/bot/drift?days=0", headers=acme)
    assert bad.status_code == 400 and "days" in bad.json()["error"]["message"]


def test_a_foreign_adapter_is_answered_like_an_unknown_one(
    registry: Registry, client: TestClient, built: tuple[Path, Path]
) -> None:
    tenant_id, _ = tenant_with_key(registry, "acme")
    _, globex = tenant_with_key(registry, "globex")
    registry.register_base(built[0], "tiny", "r1", ROOT)
    registry.push_adapter(tenant_id, "bot", built[1], "tiny", ROOT)
    foreign = client.get("/v1/adapters/bot/drift", headers=globex)
    unknown = client.get("/v1/adapters/zzz/drift", headers=globex)
    assert foreign.status_code == unknown.status_code == 404
    assert set(foreign.json()["error"]) == {"message", "type", "param", "code"}
    assert (
        foreign.json()["error"]["message"].replace("bot", "zzz")
        == unknown.json()["error"]["message"]
    )
    assert client.get("/v1/adapters/bot/drift").status_code == 401
