"""The event log over HTTP (server/api/events_routes.py), on SQLite and PostgreSQL: a
tenant pages through its own events with a cursor and never sees another tenant's; a
foreign event answers exactly like an unknown one; the admin reads everyone's."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from registry import Actor, Registry
from server.api import events_routes
from server.gateway.app import install_error_handlers
from tests.server.api.conftest import client_for
from tests.server.api.test_webhook_routes import _error, _tenant, drift_event

ROOT = Actor("test-root", admin=True)


@pytest.fixture
def client(registry: Registry) -> TestClient:
    client = client_for(registry, events_routes.routes)
    install_error_handlers(client.app)  # type: ignore[arg-type]
    return client


def test_a_tenant_pages_through_its_own_events(registry: Registry, client: TestClient) -> None:
    acme, headers = _tenant(registry, "acme")
    globex, _ = _tenant(registry, "globex")
    for adapter in ("a", "b", "c"):
        drift_event(registry, acme, adapter)
        drift_event(registry, globex, adapter)
    first = client.get("/v1/events?limit=2", headers=headers).json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [e["data"]["adapter"] for e in first["data"]] == ["a", "b"]
    event = first["data"][0]
    assert set(event) == {"object", "id", "type", "created_at", "tenant", "data"}
    assert (event["object"], event["type"], event["tenant"]) == (
        "event", "adapter.drift.detected", "acme"
    )  # fmt: skip
    rest = client.get(f"/v1/events?after={first['last_id']}", headers=headers).json()
    assert [e["data"]["adapter"] for e in rest["data"]] == ["c"] and rest["has_more"] is False
    empty = client.get(f"/v1/events?after={rest['last_id']}", headers=headers).json()
    assert (empty["data"], empty["last_id"]) == ([], rest["last_id"])
    none = client.get("/v1/events?type=adapter.promoted", headers=headers).json()["data"]
    assert none == []
    bad = client.get("/v1/events?type=adapter.exploded", headers=headers)
    assert "unknown event type" in _error(bad, 400, "invalid_request")["message"]


def test_a_foreign_event_answers_like_an_unknown_one(
    registry: Registry, client: TestClient
) -> None:
    acme, acme_headers = _tenant(registry, "acme")
    _, globex_headers = _tenant(registry, "globex")
    drift_event(registry, acme)
    (mine,) = client.get("/v1/events", headers=acme_headers).json()["data"]
    assert client.get(f"/v1/events/{mine['id']}", headers=acme_headers).json() == mine
    foreign = client.get(f"/v1/events/{mine['id']}", headers=globex_headers)
    unknown = client.get(f"/v1/events/{mine['id'] + 1000}", headers=globex_headers)
    assert foreign.status_code == unknown.status_code == 404
    assert _error(foreign, 404, "not_found")["message"] == f"event {mine['id']} does not exist"
    assert unknown.json()["error"]["message"] == f"event {mine['id'] + 1000} does not exist"
    assert client.get("/v1/events", headers=globex_headers).json()["data"] == []


def test_the_admin_reads_every_tenants_events(registry: Registry, client: TestClient) -> None:
    acme, acme_headers = _tenant(registry, "acme")
    globex, _ = _tenant(registry, "globex")
    drift_event(registry, acme)
    drift_event(registry, globex)
    admin = {"authorization": f"Bearer {registry.create_api_key(None, 'admin', ROOT)[1]}"}
    every = client.get("/admin/events", headers=admin).json()["data"]
    assert [e["tenant"] for e in every] == ["acme", "globex"]
    one = client.get("/admin/events?tenant=globex", headers=admin).json()["data"]
    assert [e["tenant"] for e in one] == ["globex"]
    after = client.get(f"/admin/events?after={every[0]['id']}", headers=admin).json()["data"]
    assert [e["tenant"] for e in after] == ["globex"]
    _error(client.get("/admin/events?tenant=nobody", headers=admin), 404, "not_found")
    _error(client.get("/admin/events", headers=acme_headers), 403, "admin_key_required")
    _error(client.get("/v1/events", headers=admin), 403, "tenant_key_required")
