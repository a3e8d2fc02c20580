"""The composition route over HTTP (server/api/composition_routes.py), on SQLite and
PostgreSQL: a composed version answered like a pushed one, its recipe in provenance;
refusals as one precise 400 in OpenAI's shape with nothing written; a foreign parent
answers exactly like an unknown one; the admin's route acts for a named tenant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from registry import Actor, Registry
from server.api import registry_routes
from server.gateway.app import install_error_handlers
from tests.registry.registry_testdata import blob_keys, build_adapter, build_tiny_base
from tests.server.api.conftest import client_for, tenant_with_key

ROOT = Actor("test-root", admin=True)
A_AT_1 = {"adapter": "a", "version": 1, "weight": 0.7}
TIES: dict[str, Any] = {
    "parents": [
        A_AT_1,
        {"adapter": "b", "version": 1, "weight": 0.3},
    ],
    "method": "ties",
    "density": 0.5,
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("composition-routes")
    base = build_tiny_base(root / "tiny")
    return base, build_adapter(base, root / "a", seed=1), build_adapter(base, root / "b", seed=2)


@pytest.fixture
def acme(registry: Registry, built: tuple[Path, Path, Path]) -> tuple[int, dict[str, str]]:
    """Tenant acme with adapters a and b (version 1 each); tenant globex with secret."""
    tenant_id, headers = tenant_with_key(registry, "acme")
    registry.register_base(built[0], "tiny", "r1", ROOT)
    registry.push_adapter(tenant_id, "a", built[1], "tiny", ROOT)
    registry.push_adapter(tenant_id, "b", built[2], "tiny", ROOT)
    globex, _ = tenant_with_key(registry, "globex")
    registry.push_adapter(globex, "secret", built[1], "tiny", ROOT)
    return tenant_id, headers


@pytest.fixture
def client(registry: Registry) -> TestClient:
    client = client_for(registry, registry_routes.routes)
    install_error_handlers(client.app)  # type: ignore[arg-type]  # the gateway's 400s
    return client


def test_a_composition_is_answered_like_a_pushed_version(
    client: TestClient, acme: tuple[int, dict[str, str]]
) -> None:
    _, headers = acme
    answer = client.post("/v1/adapters/mix/compositions", json=TIES, headers=headers)
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert (body["object"], body["version"], body["rank"], body["alpha"]) == (
        "adapter.version", 1, 16, 16.0,
    )  # fmt: skip
    composition = body["provenance"]["composition"]
    assert (composition["method"], composition["density"], composition["target_rank"]) == (
        "ties", 0.5, 16,
    )  # fmt: skip
    assert [(p["adapter"], p["version"], p["weight"]) for p in composition["parents"]] == [
        ("a", 1, 0.7), ("b", 1, 0.3),
    ]  # fmt: skip
    shown = client.get("/v1/adapters/mix", headers=headers).json()
    assert [v["provenance"]["composition"] for v in shown["versions"]] == [composition]
    smaller = {**TIES, "method": "linear", "density": None, "target_rank": 4}
    second = client.post("/v1/adapters/mix/compositions", json=smaller, headers=headers)
    assert second.status_code == 201, second.text
    assert (second.json()["version"], second.json()["rank"]) == (2, 4)


def test_the_admin_composes_for_a_named_tenant(
    registry: Registry, client: TestClient, acme: tuple[int, dict[str, str]]
) -> None:
    tenant_id, _ = acme
    _, key = registry.create_api_key(None, "admin", ROOT)
    admin = {"authorization": f"Bearer {key}"}
    answer = client.post("/admin/tenants/acme/adapters/mix/compositions", json=TIES, headers=admin)
    assert answer.status_code == 201, answer.text
    (version,) = registry.list_versions(tenant_id, "mix")
    assert version.composition is not None and version.composition["method"] == "ties"


def refused(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    answer = client.post("/v1/adapters/mix/compositions", json=body, headers=headers)
    assert answer.status_code == 400, answer.text
    error: dict[str, Any] = answer.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "composition_rejected")
    return error


def with_parent(name: str) -> dict[str, Any]:
    return {**TIES, "parents": [A_AT_1, {"adapter": name, "version": 1, "weight": 1}]}


def test_a_foreign_parent_answers_exactly_like_an_unknown_one(
    client: TestClient, acme: tuple[int, dict[str, str]]
) -> None:
    _, headers = acme
    foreign = refused(client, headers, with_parent("secret"))
    unknown = refused(client, headers, with_parent("nothing"))
    assert "adapter 'secret' does not exist" in foreign["message"]
    assert foreign == {**unknown, "message": unknown["message"].replace("nothing", "secret")}


def test_bad_input_is_one_precise_400_and_nothing_is_written(
    registry: Registry, client: TestClient, acme: tuple[int, dict[str, str]]
) -> None:
    tenant_id, headers = acme
    blobs, events = blob_keys(registry.blobs), registry.audit_log()
    bad = {**with_parent("nothing"), "method": "magic", "target_rank": 65}
    error = refused(client, headers, bad)
    assert error["message"].startswith("composition rejected (4 problem(s)); fix these and retry:")
    for problem in (
        "method 'magic' is not one of linear, ties, dare_linear, dare_ties",
        "density is used only by ties, dare_linear, dare_ties",
        "target_rank 65 must be between 1 and the serving rank 64",
        "parent nothing@1: adapter 'nothing' does not exist",
    ):
        assert problem in error["message"]
    assert "density" in refused(client, headers, {**TIES, "density": None})["message"]
    shapeless = client.post(
        "/v1/adapters/mix/compositions", json={"method": "ties"}, headers=headers
    )
    assert shapeless.status_code == 400 and "parents" in shapeless.json()["error"]["message"]
    assert registry.get_adapter(tenant_id, "mix") is None
    assert (blob_keys(registry.blobs), registry.audit_log()) == (blobs, events)
