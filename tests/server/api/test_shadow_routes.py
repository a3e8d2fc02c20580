"""The shadow routes over HTTP (server/api/shadow_routes.py), on SQLite and PostgreSQL:
set, show, record as evals, clear; refusals as precise 4xx in OpenAI's shape; the admin's
routes act for a named tenant; a foreign adapter answers exactly like an unknown one."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from registry import Actor, Registry
from registry.shadow import ShadowBatch, ShadowStore
from server.api import registry_routes
from server.gateway.app import install_error_handlers
from tests.registry.registry_testdata import build_adapter, build_tiny_base
from tests.server.api.conftest import client_for, tenant_with_key

ROOT = Actor("test-root", admin=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("shadow-routes")
    base = build_tiny_base(root / "tiny")
    return base, build_adapter(base, root / "v1", seed=1), build_adapter(base, root / "v2", seed=2)


@pytest.fixture
def acme(registry: Registry, built: tuple[Path, Path, Path]) -> tuple[int, dict[str, str]]:
    """Tenant acme with adapter bot: version 1 in production, version 2 pushed."""
    tenant_id, headers = tenant_with_key(registry, "acme")
    registry.register_base(built[0], "tiny", "r1", ROOT)
    registry.push_adapter(tenant_id, "bot", built[1], "tiny", ROOT)
    registry.promote(tenant_id, "bot", 1, ROOT)
    registry.push_adapter(tenant_id, "bot", built[2], "tiny", ROOT)
    return tenant_id, headers


@pytest.fixture
def client(registry: Registry) -> TestClient:
    client = client_for(registry, registry_routes.routes)
    install_error_handlers(client.app)  # type: ignore[arg-type]  # the gateway's 400s
    return client


def test_a_shadow_is_set_shown_recorded_and_cleared(
    registry: Registry, client: TestClient, acme: tuple[int, dict[str, str]]
) -> None:
    tenant_id, headers = acme
    answer = client.post(
        "/v1/adapters/bot/shadow", json={"version": 2, "share": 0.5}, headers=headers
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["object"], body["version"], body["share"], body["production_version"]) == (
        "adapter.shadow", 2, 0.5, 1,
    )  # fmt: skip
    assert body["results"]["compared"] == 0 and body["results"]["agreement"] is None
    refused = client.post("/v1/adapters/bot/shadow/evals", headers=headers)
    assert refused.status_code == 409 and "no shadow copies" in refused.json()["error"]["message"]
    ShadowStore(registry).add(
        ShadowBatch(tenant_id, "bot", 2, 1, [(["a"], ["a"]), (["{}"], ["b"])])
    )
    results = client.get("/v1/adapters/bot/shadow", headers=headers).json()["results"]
    assert (results["compared"], results["agreed"], results["agreement"]) == (2, 1, 0.5)
    assert (results["json_checked"], results["json_passed"], results["json_valid"]) == (1, 0, 0.0)
    recorded = client.post("/v1/adapters/bot/shadow/evals", json={"version": 2}, headers=headers)
    assert recorded.status_code == 200, recorded.text
    data = recorded.json()["data"]
    assert {(r["suite"], r["metric"], r["value"]) for r in data} == {
        ("shadow", "agreement", 0.5), ("shadow", "json_valid", 0.0),
    }  # fmt: skip
    assert client.delete("/v1/adapters/bot/shadow", headers=headers).status_code == 204
    assert client.get("/v1/adapters/bot/shadow", headers=headers).json()["version"] is None
    again = client.delete("/v1/adapters/bot/shadow", headers=headers)
    assert again.status_code == 409 and "no shadow alias" in again.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"version": 2, "share": 0}, 400, "share"),
        ({"version": 2, "share": 1.5}, 400, "share"),
        ({"version": 2}, 400, "share"),
        ({"version": 9, "share": 0.5}, 404, "no version 9"),
        ({"version": 1, "share": 0.5}, 409, "is the production version"),
    ],
)
def test_bad_shadow_requests_are_precise_4xx_and_change_nothing(
    registry: Registry,
    client: TestClient,
    acme: tuple[int, dict[str, str]],
    body: dict[str, float],
    status: int,
    words: str,
) -> None:
    tenant_id, headers = acme
    answer = client.post("/v1/adapters/bot/shadow", json=body, headers=headers)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]["message"]
    assert ShadowStore(registry).status(tenant_id, "bot").version is None


def test_the_admin_acts_for_a_named_tenant(
    registry: Registry, client: TestClient, acme: tuple[int, dict[str, str]]
) -> None:
    admin = {"authorization": f"Bearer {registry.create_api_key(None, 'admin', ROOT)[1]}"}
    path = "/admin/tenants/acme/adapters/bot/shadow"
    assert client.post(path, json={"version": 2, "share": 1.0}, headers=admin).status_code == 200
    assert client.get(path, headers=admin).json()["share"] == 1.0


def test_a_foreign_adapter_answers_exactly_like_an_unknown_one(
    registry: Registry, client: TestClient, acme: tuple[int, dict[str, str]]
) -> None:
    _, globex = tenant_with_key(registry, "globex")
    for method, path, json in [
        ("GET", "shadow", None),
        ("POST", "shadow", {"version": 2, "share": 0.5}),
        ("DELETE", "shadow", None),
        ("POST", "shadow/evals", None),
    ]:
        answers = [
            client.request(method, f"/v1/adapters/{name}/{path}", json=json, headers=globex)
            for name in ("bot", "nothing")
        ]
        assert [a.status_code for a in answers] == [404, 404]
        messages = [a.json()["error"]["message"].replace("nothing", "bot") for a in answers]
        assert messages[0] == messages[1], (method, path)
