"""The webhook deliverer (server/webhooks/delivery.py and attach) against a real HTTP
receiver on loopback (allowed as the operator would, by the guard's allow list), on a
SQLite registry: signed posts that verify, retries after 500s, dead after N failures,
and the loop running inside an app's lifespan."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session

from registry import Actor, LocalBlobStore, Registry, audit
from registry.webhooks import Backoff, WebhookStore
from server.config import Settings
from server.webhooks import attach
from server.webhooks.delivery import Deliverer
from server.webhooks.ssrf import Guard
from tests.server.webhooks.test_signing import verify

ROOT = Actor("test-root", admin=True)


class Receiver:
    """A loopback HTTP server answering each POST with the next of ``statuses``."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.received: list[tuple[dict[str, str], bytes, float]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append(
                    ({k.lower(): v for k, v in self.headers.items()}, body, time.monotonic())
                )
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "blobs"))
    yield registry
    registry.close()


def _subscribe(registry: Registry, url: str) -> tuple[int, str, str]:
    tenant_id = registry.create_tenant("acme", ROOT).id
    assert tenant_id is not None
    sub = WebhookStore(registry).create(tenant_id, url, [])
    with Session(registry.database) as s, s.begin():
        audit.record(s, "gw", "adapter.drift", "adapter:acme/bot", tenant_id=tenant_id)
    return tenant_id, sub.id, sub.secret


def _rounds(deliverer: Deliverer, count: int, pause: float = 0.0) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            for _ in range(count):
                await deliverer.round(client)
                await asyncio.sleep(pause)

    asyncio.run(run())


def _deliverer(registry: Registry, backoff: Backoff) -> Deliverer:
    return Deliverer(WebhookStore(registry), Guard(["127.0.0.1/32"]), backoff, 5.0, 0.01)


def test_a_signed_event_is_retried_after_500s_then_delivered(
    registry: Registry, receiver: Receiver
) -> None:
    tenant_id, sub_id, secret = _subscribe(registry, receiver.url)
    receiver.statuses = [500, 500]
    _rounds(_deliverer(registry, Backoff(first=0.2, cap=1.0, max_attempts=5)), 12, 0.1)
    assert len(receiver.received) == 3
    ids = {headers["webhook-id"] for headers, _, _ in receiver.received}
    assert len(ids) == 1  # one message, three attempts
    headers, body, _ = receiver.received[-1]
    assert verify(secret, headers, body)
    event = json.loads(body)
    assert (event["type"], event["tenant"], event["data"]["adapter"]) == (
        "adapter.drift.detected", "acme", "bot"
    )  # fmt: skip
    gaps = [b[2] - a[2] for a, b in zip(receiver.received, receiver.received[1:], strict=False)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4  # backoff doubles
    (delivery,) = WebhookStore(registry).deliveries(tenant_id, sub_id)
    assert (delivery.state, delivery.attempts, delivery.last_status) == ("delivered", 3, 200)


def test_a_receiver_that_always_fails_makes_the_delivery_dead(
    registry: Registry, receiver: Receiver
) -> None:
    tenant_id, sub_id, _ = _subscribe(registry, receiver.url)
    receiver.statuses = [503] * 10
    _rounds(_deliverer(registry, Backoff(first=0.0, cap=0.0, max_attempts=3)), 6)
    assert len(receiver.received) == 3
    (delivery,) = WebhookStore(registry).deliveries(tenant_id, sub_id)
    assert (delivery.state, delivery.attempts, delivery.last_error) == ("dead", 3, "HTTP 503")


def test_a_target_refused_at_delivery_is_a_failed_attempt(registry: Registry) -> None:
    tenant_id, sub_id, _ = _subscribe(registry, "http://127.0.0.1:9/hook")
    strict = Deliverer(WebhookStore(registry), Guard([]), Backoff(0, 0, 1), 5.0, 0.01)
    _rounds(strict, 1)
    (delivery,) = WebhookStore(registry).deliveries(tenant_id, sub_id)
    assert delivery.state == "dead" and "refused" in (delivery.last_error or "")


def test_the_deliverer_runs_in_the_apps_lifespan(registry: Registry, receiver: Receiver) -> None:
    _subscribe(registry, receiver.url)
    app = FastAPI()
    settings = Settings(webhook_allow=["127.0.0.1"], webhook_interval=0.05)
    attach(app, settings, registry)
    with TestClient(app):
        deadline = time.monotonic() + 10
        while not receiver.received and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(receiver.received) == 1
    assert app.state.webhook_guard.check(receiver.url).port == receiver.server.server_address[1]
