"""The evals-over-versions and online-metrics routes (server/api/registry_routes.py), on
SQLite and PostgreSQL: the table's shape, recording online metrics from the usage book and
feedback, the ``since`` window, and a foreign adapter answered like an unknown one."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from registry import Actor, Registry
from registry.captures import CaptureStore, FeedbackInput, NewCompletion
from registry.models import utcnow
from server.api import registry_routes
from tests.registry.registry_testdata import build_adapter, build_tiny_base
from tests.server.api.conftest import client_for

ROOT = Actor("test-root", admin=True)


@pytest.fixture(scope="module")
def peft(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft")
    base = build_tiny_base(root / "base")
    return {"base": base, **{f"v{i}": build_adapter(base, root / f"v{i}", seed=i) for i in (1, 2)}}


@pytest.fixture
def acme(registry: Registry, peft: dict[str, Path]) -> tuple[int, dict[str, str]]:
    """Tenant acme's id and key header; its adapter bot has v1 (production) and v2."""
    registry.register_base(peft["base"], "tiny", "r1", ROOT)
    tenant_id = registry.create_tenant("acme", ROOT).id
    assert tenant_id is not None
    for key in ("v1", "v2"):
        registry.push_adapter(tenant_id, "bot", peft[key], "tiny", ROOT)
    registry.promote(tenant_id, "bot", 1, ROOT)
    _, plaintext = registry.create_api_key(tenant_id, "tenant", ROOT)
    return tenant_id, {"Authorization": f"Bearer {plaintext}"}


@pytest.fixture
def client(registry: Registry) -> TestClient:
    return client_for(registry, registry_routes.routes)


def _rated(registry: Registry, tenant_id: int, thumbs: str) -> None:
    captures = CaptureStore(registry)
    captures.save([NewCompletion(
        tenant_id=tenant_id, completion_id="chatcmpl-1", model="bot@2", adapter="bot",
        version=2, route="pinned", user=None, metadata={}, stream=False, prompt_tokens=1,
        completion_tokens=1, created_at=utcnow(), request={"messages": []}, response={},
    )])  # fmt: skip
    captures.add_feedback(tenant_id, "chatcmpl-1", FeedbackInput(thumbs=thumbs))


def test_online_metrics_are_recorded_and_shown_over_versions(
    client: TestClient, registry: Registry, acme: tuple[int, dict[str, str]]
) -> None:
    tenant_id, headers = acme
    registry.record_usage(tenant_id, "bot", 2, requests=4, errors=1, latency_seconds=2.0,
                          latency_count=3, latency_buckets=[0, 0, 0, 0, 3])  # fmt: skip
    _rated(registry, tenant_id, "up")
    recorded = client.post("/v1/adapters/bot/versions/2/evals/online", headers=headers)
    assert recorded.status_code == 200, recorded.text
    body = recorded.json()
    assert (body["object"], body["adapter"], body["version"]) == (
        "adapter.online_metrics",
        "bot",
        2,
    )
    assert body["metrics"]["error_rate"] == {"value": 0.25, "sample_count": 4}
    assert body["metrics"]["thumbs_up_share"] == {"value": 1.0, "sample_count": 1}
    assert body["metrics"]["latency_mean_s"]["sample_count"] == 3
    table = client.get("/v1/adapters/bot/evals", headers=headers)
    assert table.status_code == 200, table.text
    first, second = table.json()["data"]
    assert (first["version"], first["aliases"], first["evals"]) == (1, ["production"], [])
    assert {e["metric"] for e in second["evals"]} == set(body["metrics"])
    assert all(e["suite"] == "online" and e["created_at"] for e in second["evals"])
    # A window that starts after today's usage began still counts today (usage is daily),
    # but no completion was served after it: nothing to say about feedback.
    now = utcnow()
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    later = int(min(now.timestamp() + 3600, midnight.timestamp() - 1))  # still today (UTC)
    windowed = client.post(
        "/v1/adapters/bot/versions/2/evals/online", headers=headers, params={"since": later}
    ).json()
    assert "thumbs_up_share" not in windowed["metrics"] and "error_rate" in windowed["metrics"]
    admin_path = "/admin/tenants/acme/adapters/bot/evals"
    _, admin_key = registry.create_api_key(None, "admin", ROOT)
    shown = client.get(admin_path, headers={"Authorization": f"Bearer {admin_key}"})
    assert shown.json() == client.get("/v1/adapters/bot/evals", headers=headers).json()


def test_a_version_without_traffic_records_nothing(
    client: TestClient, registry: Registry, acme: tuple[int, dict[str, str]]
) -> None:
    _, headers = acme
    recorded = client.post("/v1/adapters/bot/versions/1/evals/online", headers=headers)
    assert recorded.status_code == 200 and recorded.json()["metrics"] == {}
    missing = client.post("/v1/adapters/bot/versions/9/evals/online", headers=headers)
    assert missing.status_code == 404


def test_a_foreign_adapter_answers_like_an_unknown_one(
    client: TestClient, registry: Registry, acme: tuple[int, dict[str, str]]
) -> None:
    globex = registry.create_tenant("globex", ROOT).id
    _, plaintext = registry.create_api_key(globex, "tenant", ROOT)
    headers = {"Authorization": f"Bearer {plaintext}"}
    for method, path in (
        ("GET", "/v1/adapters/{}/evals"),
        ("POST", "/v1/adapters/{}/versions/1/evals/online"),
    ):
        foreign = client.request(method, path.format("bot"), headers=headers)
        unknown = client.request(method, path.format("zzz"), headers=headers)
        assert foreign.status_code == unknown.status_code == 404
        assert foreign.text.replace("bot", "zzz") == unknown.text
        assert set(foreign.json()["error"]) == {"message", "type", "param", "code"}
