"""The webhook routes over HTTP (server/api/webhook_routes.py), on SQLite and PostgreSQL:
create (the secret shown once), list, show, rotate, delete; the delivery log and
redelivery; SSRF refusals and limits as precise 400s/409s in OpenAI's shape; a foreign
subscription answers exactly like an unknown one."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from registry import Actor, Registry, audit
from registry.webhooks import Backoff, WebhookStore
from server.api import events_routes, webhook_routes
from server.gateway.app import install_error_handlers
from server.webhooks.ssrf import Guard
from tests.e2e.probes import error_shape_problem
from tests.server.api.conftest import client_for

ROOT = Actor("test-root", admin=True)
HOOK = "https://hooks.example.com/loraplex"
DNS = {"hooks.example.com": ["93.184.215.14"], "intranet.example.com": ["10.0.0.8"]}


def _tenant(registry: Registry, name: str) -> tuple[int, dict[str, str]]:
    tenant_id = registry.create_tenant(name, ROOT).id
    assert tenant_id is not None
    key = registry.create_api_key(tenant_id, "tenant", ROOT)[1]
    return tenant_id, {"authorization": f"Bearer {key}"}


def drift_event(registry: Registry, tenant_id: int, adapter: str = "bot") -> None:
    """A public event of the tenant's, written as the gateways' drift checks write it."""
    with Session(registry.database) as s, s.begin():
        audit.record(s, "gw", "adapter.drift", f"adapter:t/{adapter}", tenant_id=tenant_id)


@pytest.fixture
def client(registry: Registry) -> TestClient:
    client = client_for(registry, webhook_routes.routes, events_routes.routes)
    install_error_handlers(client.app)  # type: ignore[arg-type]  # the gateway's 400s
    client.app.state.webhook_guard = Guard([], resolver=lambda host, port: DNS[host])  # type: ignore[attr-defined]
    return client


def _error(answer: Any, status: int, code: str | None) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert error_shape_problem(answer) == ""
    assert answer.json()["error"]["code"] == code
    error: dict[str, Any] = answer.json()["error"]
    return error


def test_a_webhook_is_created_shown_rotated_and_deleted(
    registry: Registry, client: TestClient
) -> None:
    _, headers = _tenant(registry, "acme")
    body = {"url": HOOK, "events": ["adapter.promoted"], "description": "ops"}
    made = client.post("/v1/webhooks", json=body, headers=headers)
    assert made.status_code == 201, made.text
    hook = made.json()
    assert hook["object"] == "webhook" and hook["secret"].startswith("whsec_")
    assert (hook["url"], hook["events"], hook["description"]) == (HOOK, ["adapter.promoted"], "ops")
    listed = client.get("/v1/webhooks", headers=headers).json()["data"]
    assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
    shown = client.get(f"/v1/webhooks/{hook['id']}", headers=headers).json()
    assert "secret" not in shown and shown["previous_secret_expires_at"] is None
    rotated = client.post(
        f"/v1/webhooks/{hook['id']}/rotate-secret", json={"grace_seconds": 60}, headers=headers
    ).json()
    assert rotated["secret"] != hook["secret"] and rotated["secret"].startswith("whsec_")
    assert rotated["previous_secret_expires_at"] - rotated["created_at"] >= 59
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=headers).status_code == 204
    gone = client.get(f"/v1/webhooks/{hook['id']}", headers=headers)
    assert _error(gone, 404, "not_found")["message"] == f"webhook {hook['id']!r} does not exist"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://127.0.0.1/hook", "a loopback address"),
        ("https://169.254.169.254/", "the cloud metadata address"),
        ("https://intranet.example.com/", "resolves to a private address"),
        ("http://hooks.example.com/", "is not https"),
    ],
)
def test_ssrf_targets_are_refused_with_a_precise_400(
    registry: Registry, client: TestClient, url: str, why: str
) -> None:
    _, headers = _tenant(registry, "acme")
    error = _error(client.post("/v1/webhooks", json={"url": url}, headers=headers), 400,
                   "webhook_target_refused")  # fmt: skip
    assert why in error["message"] and error["param"] == "url"
    assert client.get("/v1/webhooks", headers=headers).json()["data"] == []


def test_refusals_and_limits(registry: Registry, client: TestClient) -> None:
    _, headers = _tenant(registry, "acme")
    unknown = client.post("/v1/webhooks", json={"url": HOOK, "events": ["x.y"]}, headers=headers)
    assert "unknown event type(s) x.y" in _error(unknown, 400, "invalid_request")["message"]
    long = client.post("/v1/webhooks", json={"url": HOOK + "a" * 2048}, headers=headers)
    assert _error(long, 400, None)["param"] == "url"  # pydantic's refusal names the field
    client.app.state.webhook_max_per_tenant = 1  # type: ignore[attr-defined]
    assert client.post("/v1/webhooks", json={"url": HOOK}, headers=headers).status_code == 201
    full = client.post("/v1/webhooks", json={"url": HOOK}, headers=headers)
    assert "delete one first" in _error(full, 409, "conflict")["message"]
    admin = {"authorization": f"Bearer {registry.create_api_key(None, 'admin', ROOT)[1]}"}
    _error(client.get("/v1/webhooks", headers=admin), 403, "tenant_key_required")
    del client.app.state.webhook_guard  # type: ignore[attr-defined]
    off = client.post("/v1/webhooks", json={"url": HOOK}, headers=headers)
    _error(off, 503, "webhooks_disabled")


def test_a_foreign_webhook_answers_like_an_unknown_one(
    registry: Registry, client: TestClient
) -> None:
    _, acme = _tenant(registry, "acme")
    _, globex = _tenant(registry, "globex")
    hook = client.post("/v1/webhooks", json={"url": HOOK}, headers=acme).json()["id"]
    probes = [
        ("get", f"/v1/webhooks/{hook}"),
        ("delete", f"/v1/webhooks/{hook}"),
        ("post", f"/v1/webhooks/{hook}/rotate-secret"),
        ("get", f"/v1/webhooks/{hook}/deliveries"),
        ("post", f"/v1/webhooks/{hook}/deliveries/msg_x/redeliver"),
    ]
    foreign = [client.request(m, path, headers=globex) for m, path in probes]
    assert client.get(f"/v1/webhooks/{hook}", headers=acme).status_code == 200  # untouched
    client.delete(f"/v1/webhooks/{hook}", headers=acme)
    unknown = [client.request(m, path, headers=globex) for m, path in probes]
    for mine, other in zip(foreign, unknown, strict=True):
        assert (mine.status_code, mine.json()) == (other.status_code, other.json())
        assert mine.status_code == 404


def test_the_delivery_log_and_redelivery(registry: Registry, client: TestClient) -> None:
    tenant_id, headers = _tenant(registry, "acme")
    hook = client.post("/v1/webhooks", json={"url": HOOK}, headers=headers).json()["id"]
    drift_event(registry, tenant_id)
    store = WebhookStore(registry)
    store.fan_out()
    (claimed,) = store.claim("gw", dt.timedelta(seconds=30))
    store.finish(claimed.delivery_id, "gw", Backoff(max_attempts=1), 502, "HTTP 502")
    log = client.get(f"/v1/webhooks/{hook}/deliveries", headers=headers).json()["data"]
    assert [(d["state"], d["attempts"], d["last_status"], d["last_error"]) for d in log] == [
        ("dead", 1, 502, "HTTP 502")
    ]  # fmt: skip
    assert log[0]["event_id"] == claimed.event.id and log[0]["next_attempt_at"] is None
    again = client.post(f"/v1/webhooks/{hook}/deliveries/{log[0]['id']}/redeliver", headers=headers)
    assert again.status_code == 200 and again.json()["state"] == "pending"
    assert again.json()["next_attempt_at"] is not None
    twice = client.post(f"/v1/webhooks/{hook}/deliveries/{log[0]['id']}/redeliver", headers=headers)
    assert "only dead ones" in _error(twice, 409, "conflict")["message"]
    pending = client.get(f"/v1/webhooks/{hook}/deliveries?state=pending", headers=headers)
    assert len(pending.json()["data"]) == 1
    bad = client.get(f"/v1/webhooks/{hook}/deliveries?state=lost", headers=headers)
    _error(bad, 400, "invalid_request")
