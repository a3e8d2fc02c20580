"""Lifecycle webhooks end to end: a real gateway on PostgreSQL in front of the real vLLM
engine, its deliverer running in its lifespan, and real HTTP receivers on loopback
(allowed by ``LORAPLEX_WEBHOOK_ALLOW``, as an operator would allow an internal receiver).

Tenant acme subscribes three receivers to ``adapter.promoted`` and promotes a version: the
healthy receiver gets one signed message that verifies by the published scheme and is
the event ``/v1/events`` shows; the one answering 500 twice gets it a third time after
doubling waits and it is delivered; the one that always fails has it go dead after
``LORAPLEX_WEBHOOK_MAX_ATTEMPTS`` tries, and a redelivery sends it again. SSRF targets
are refused even with loopback allowed; tenant globex sees none of acme's events or
webhooks: each answers exactly like an unknown one.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry import Registry
from tests.e2e.conftest import OPERATOR, TenantKeys, make_tenant
from tests.e2e.probes import error_shape_problem, postgres_gateway
from tests.e2e.serving import ServeProcess
from tests.registry.registry_testdata import build_adapter
from tests.server.webhooks.test_delivery import Receiver
from tests.server.webhooks.test_signing import verify

ADAPTER = "hooked"
ATTEMPTS = 3
BACKOFF = 0.3
SETTINGS = {
    "LORAPLEX_WEBHOOK_ALLOW": "127.0.0.1",
    "LORAPLEX_WEBHOOK_MAX_ATTEMPTS": str(ATTEMPTS),
    "LORAPLEX_WEBHOOK_BACKOFF": str(BACKOFF),
    "LORAPLEX_WEBHOOK_BACKOFF_MAX": "5",
    "LORAPLEX_WEBHOOK_INTERVAL": "0.1",
}
WITHIN = 30.0


class Site:
    def __init__(self, serve: ServeProcess, registry: Registry, acme: TenantKeys,
                 globex: TenantKeys) -> None:  # fmt: skip
        self.serve, self.registry = serve, registry
        self.acme = httpx.Client(base_url=serve.url, headers=_bearer(acme), timeout=30)
        self.globex = httpx.Client(base_url=serve.url, headers=_bearer(globex), timeout=30)
        self.hooks: dict[str, tuple[str, str, Receiver]] = {}
        """Receiver role -> (webhook id, its secret, the receiver)."""


def _bearer(tenant: TenantKeys) -> dict[str, str]:
    return {"authorization": f"Bearer {tenant.key}"}


def _until(what: str, done: Any) -> None:
    deadline = time.monotonic() + WITHIN
    while not done():
        assert time.monotonic() < deadline, f"not within {WITHIN} s: {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def site(
    gateway: ServeProcess, registry: Registry, demo_base: Path, engine_port: int,
    engine_key: str, tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Site]:  # fmt: skip
    root = tmp_path_factory.mktemp("webhooks")
    weights = build_adapter(demo_base, root / "v1", seed=71, r=8)
    receivers = [Receiver() for _ in range(3)]
    with pytest.MonkeyPatch.context() as env:
        for name, value in SETTINGS.items():
            env.setenv(name, value)  # the extra gateway starts with these settings
        with postgres_gateway("loraplex_webhooks_e2e", root / "home", engine_port, engine_key,
                              demo_base) as (serve, own):  # fmt: skip
            run = uuid.uuid4().hex[:6]
            acme, globex = make_tenant(own, f"acme-{run}"), make_tenant(own, f"globex-{run}")
            # The session's engine loads adapters from the session gateway's registry and blobs.
            holder = make_tenant(registry, f"webhooks-engine-side-{run}")
            own.push_adapter(acme.tenant_id, ADAPTER, weights, demo_base.name, OPERATOR)
            registry.push_adapter(holder.tenant_id, ADAPTER, weights, demo_base.name, OPERATOR)
            site = Site(serve, own, acme, globex)
            for role, receiver in zip(("healthy", "flaky", "failing"), receivers, strict=True):
                _subscribe(site, role, receiver)
            yield site
    for receiver in receivers:
        receiver.server.shutdown()


def _subscribe(site: Site, role: str, receiver: Receiver) -> None:
    body = {"url": receiver.url, "events": ["adapter.promoted"], "description": role}
    made = site.acme.post("/v1/webhooks", json=body)
    assert made.status_code == 201, made.text
    site.hooks[role] = (made.json()["id"], made.json()["secret"], receiver)


def _deliveries(site: Site, role: str) -> list[dict[str, Any]]:
    answer = site.acme.get(f"/v1/webhooks/{site.hooks[role][0]}/deliveries")
    assert answer.status_code == 200, answer.text
    data: list[dict[str, Any]] = answer.json()["data"]
    return data


def test_a_promotion_is_delivered_signed_retried_and_dead_lettered(site: Site) -> None:
    site.hooks["flaky"][2].statuses = [500, 500]
    site.hooks["failing"][2].statuses = [500] * 100
    promoted = site.acme.post(f"/v1/adapters/{ADAPTER}/promote", json={"version": 1})
    assert promoted.status_code == 200, promoted.text

    hook_id, secret, healthy = site.hooks["healthy"]
    _until("the healthy receiver got the message", lambda: healthy.received)
    headers, body, _ = healthy.received[0]
    assert verify(secret, headers, body)
    assert not verify(site.hooks["flaky"][1], headers, body)  # each webhook its own secret
    event = json.loads(body)
    assert (event["type"], event["data"]["adapter"], event["data"]["version"]) == (
        "adapter.promoted", ADAPTER, 1
    )  # fmt: skip
    listed = site.acme.get("/v1/events", params={"type": "adapter.promoted"}).json()["data"]
    assert [e["id"] for e in listed] == [event["id"]] and listed[0] == event
    _until("delivered", lambda: _deliveries(site, "healthy")[0]["state"] == "delivered")
    (delivery,) = _deliveries(site, "healthy")
    assert (delivery["id"], delivery["attempts"]) == (headers["webhook-id"], 1)

    flaky = site.hooks["flaky"][2]
    _until("the flaky receiver's third attempt", lambda: len(flaky.received) >= 3)
    times = [when for _, _, when in flaky.received]
    assert times[1] - times[0] >= BACKOFF and times[2] - times[1] >= 2 * BACKOFF
    assert len({h["webhook-id"] for h, _, _ in flaky.received}) == 1
    assert verify(site.hooks["flaky"][1], *flaky.received[2][:2])
    _until("flaky delivered", lambda: _deliveries(site, "flaky")[0]["state"] == "delivered")
    assert _deliveries(site, "flaky")[0]["attempts"] == 3

    failing = site.hooks["failing"][2]
    _until("dead", lambda: _deliveries(site, "failing")[0]["state"] == "dead")
    (dead,) = _deliveries(site, "failing")
    assert (dead["attempts"], dead["last_status"], len(failing.received)) == (ATTEMPTS, 500, 3)
    failing.statuses = []  # the receiver is fixed: a redelivery now succeeds
    path = f"/v1/webhooks/{site.hooks['failing'][0]}/deliveries/{dead['id']}/redeliver"
    assert site.acme.post(path).json()["state"] == "pending"
    _until("redelivered", lambda: _deliveries(site, "failing")[0]["state"] == "delivered")
    assert len(failing.received) == 4 and hook_id != site.hooks["failing"][0]


@pytest.mark.parametrize(
    "url",
    [
        "https://169.254.169.254/latest",
        "https://10.0.0.1/",
        "https://127.0.0.2/",
        "http://[::1]:1/",
    ],
)  # loopback is allowed at 127.0.0.1 only
def test_ssrf_targets_are_refused(site: Site, url: str) -> None:
    refused = site.acme.post("/v1/webhooks", json={"url": url})
    assert refused.status_code == 400 and error_shape_problem(refused) == "", refused.text
    assert refused.json()["error"]["code"] == "webhook_target_refused"


def test_a_foreign_tenants_events_and_webhooks_answer_like_unknown_ones(site: Site) -> None:
    mine = [e for e in site.acme.get("/v1/events").json()["data"] if e["tenant"] is not None]
    assert mine, "acme has events of its own"
    theirs = site.globex.get("/v1/events").json()["data"]
    assert theirs and {e["type"] for e in theirs} == {"base.registered"}  # the platform's only
    event_id, hook_id = mine[-1]["id"], site.hooks["healthy"][0]
    for foreign, unknown in [
        (f"/v1/events/{event_id}", f"/v1/events/{event_id + 10**6}"),
        (f"/v1/webhooks/{hook_id}", "/v1/webhooks/wh_unknown"),
        (f"/v1/webhooks/{hook_id}/deliveries", "/v1/webhooks/wh_unknown/deliveries"),
    ]:
        got, expected = site.globex.get(foreign), site.globex.get(unknown)
        assert got.status_code == expected.status_code == 404
        same = expected.text.replace(unknown.split("/")[3], foreign.split("/")[3])
        assert got.text == same
    assert site.globex.get("/v1/webhooks").json()["data"] == []
    rotated = site.globex.post(f"/v1/webhooks/{hook_id}/rotate-secret")
    assert rotated.status_code == 404
    assert site.acme.get(f"/v1/webhooks/{hook_id}").status_code == 200  # untouched
