"""Online metrics end to end, on the real vLLM engine: a candidate version serves stored
chat completions, clients rate them through the API, the gateway books its requests and
latency, the REST route records its online metrics, and a gate on
``online/thumbs_up_share`` first blocks its promotion, then (the feedback changed; only
each completion's latest counts) allows it. The evals over versions show the numbers."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from registry import ADMIN_SCOPE, Registry
from registry.captures import CaptureStore, CompletionQuery
from tests.e2e.conftest import OPERATOR, TenantKeys, make_tenant
from tests.e2e.serving import ServeProcess
from tests.registry.registry_testdata import build_adapter

ADAPTER = "rated"
MESSAGES = [{"role": "user", "content": "Hi"}]
WITHIN = 30.0
"""Seconds a stored completion, or the usage flush, may take before the test gives up."""


@pytest.fixture(scope="module")
def owner(
    gateway: ServeProcess,
    registry: Registry,
    demo_base: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> TenantKeys:
    """A tenant with capture on and adapter ``rated``: v1 in production, v2 a candidate."""
    return _owner(gateway, registry, demo_base, tmp_path_factory.mktemp("online"))


def _owner(gateway: ServeProcess, registry: Registry, demo_base: Path, root: Path) -> TenantKeys:
    tenant = make_tenant(registry, f"online-{uuid.uuid4().hex[:6]}")
    for number, seed in ((1, 31), (2, 32)):
        weights = build_adapter(demo_base, root / f"v{number}", seed=seed, r=8)
        registry.push_adapter(tenant.tenant_id, ADAPTER, weights, demo_base.name, OPERATOR)
    registry.promote(tenant.tenant_id, ADAPTER, 1, OPERATOR)
    _, admin_key = registry.create_api_key(None, ADMIN_SCOPE, OPERATOR)
    reply = httpx.put(
        f"{gateway.url}/admin/tenants/{tenant.name}/capture",
        json={"enabled": True},
        headers={"authorization": f"Bearer {admin_key}"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    return tenant


def _http(gateway: ServeProcess, tenant: TenantKeys) -> httpx.Client:
    auth = {"authorization": f"Bearer {tenant.key}"}
    return httpx.Client(base_url=gateway.url, headers=auth, timeout=60)


def _served(gateway: ServeProcess, registry: Registry, tenant: TenantKeys) -> list[str]:
    """Three stored answers of version 2 (pinned), once all are stored."""
    client = OpenAI(base_url=gateway.url + "/v1", api_key=tenant.key, max_retries=0)
    ids = [
        client.chat.completions.create(
            model=f"{ADAPTER}@2", messages=MESSAGES, max_tokens=4, temperature=0, store=True
        ).id  # type: ignore[arg-type]
        for _ in range(3)
    ]
    deadline = time.monotonic() + WITHIN
    query = CompletionQuery(adapter=ADAPTER, version=2, limit=100)
    while len(CaptureStore(registry).list_completions(tenant.tenant_id, query)) < len(ids):
        assert time.monotonic() < deadline, "the answers were not stored"
        time.sleep(0.2)
    return ids


def _rate(http: httpx.Client, ids: list[str], *thumbs: str) -> None:
    for completion_id, given in zip(ids, thumbs, strict=True):
        made = http.post(f"/v1/chat/completions/{completion_id}/feedback", json={"thumbs": given})
        assert made.status_code == 200, made.text


def _record(http: httpx.Client) -> dict[str, Any]:
    reply = http.post(f"/v1/adapters/{ADAPTER}/versions/2/evals/online")
    assert reply.status_code == 200, reply.text
    metrics: dict[str, Any] = reply.json()["metrics"]
    return metrics


def _booked(http: httpx.Client, requests: int) -> dict[str, Any]:
    """The online metrics once the usage flush (once a second) has booked ``requests``."""
    deadline = time.monotonic() + WITHIN
    while (metrics := _record(http)).get("error_rate", {}).get("sample_count", 0) < requests:
        assert time.monotonic() < deadline, f"usage was not booked: {metrics}"
        time.sleep(0.5)
    return metrics


def test_a_gate_on_the_thumbs_up_share_blocks_then_allows_a_promotion(
    gateway: ServeProcess, registry: Registry, owner: TenantKeys
) -> None:
    ids = _served(gateway, registry, owner)
    with _http(gateway, owner) as http:
        gates = [{"suite": "online", "metric": "thumbs_up_share", "min_value": 0.6},
                 {"suite": "online", "metric": "error_rate", "min_value": 0.05,
                  "higher_is_better": False}]  # fmt: skip
        assert http.put(f"/v1/adapters/{ADAPTER}/gates", json={"gates": gates}).status_code == 200
        _rate(http, ids, "up", "down", "down")
        metrics = _booked(http, len(ids))
        assert metrics["thumbs_up_share"] == {"value": pytest.approx(1 / 3), "sample_count": 3}
        assert metrics["error_rate"]["value"] == 0.0
        assert metrics["latency_mean_s"]["value"] > 0 and "latency_p95_s" in metrics
        refused = http.post(f"/v1/adapters/{ADAPTER}/promote", json={"version": 2})
        assert refused.status_code == 409, refused.text
        assert "online/thumbs_up_share" in refused.json()["error"]["message"]
        _rate(http, ids[1:], "up", "up")  # changed their minds: the latest feedback counts
        assert _record(http)["thumbs_up_share"]["value"] == 1.0
        promoted = http.post(f"/v1/adapters/{ADAPTER}/promote", json={"version": 2})
        assert promoted.status_code == 200, promoted.text
        table = http.get(f"/v1/adapters/{ADAPTER}/evals").json()["data"]
    assert [(v["version"], v["aliases"]) for v in table] == [(1, []), (2, ["production"])]
    shown = {e["metric"]: e for e in table[1]["evals"] if e["suite"] == "online"}
    assert shown["thumbs_up_share"]["value"] == 1.0
    assert shown["thumbs_up_share"]["sample_count"] == 3


def test_another_tenant_gets_404_like_for_an_unknown_adapter(
    gateway: ServeProcess, registry: Registry, owner: TenantKeys
) -> None:
    other = make_tenant(registry, f"online-other-{uuid.uuid4().hex[:6]}")
    with _http(gateway, other) as http:
        for path in ("/v1/adapters/{}/evals", "/v1/adapters/{}/versions/1/evals/online"):
            method = "GET" if path.endswith("/evals") else "POST"
            foreign = http.request(method, path.format(ADAPTER))
            never = http.request(method, path.format("never-made"))
            assert foreign.status_code == 404, foreign.text
            assert foreign.text.replace(ADAPTER, "X") == never.text.replace("never-made", "X")
            assert set(foreign.json()["error"]) == {"message", "type", "param", "code"}
