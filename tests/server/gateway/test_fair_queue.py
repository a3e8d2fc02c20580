"""The gateway's fair queue (``FairGate``) on a real event loop: waiting, waking, timing out,
clients leaving; nothing held after any of them. The ASGI ``receive`` of a client that
stays connected, or that disconnects on cue, is a fake (``FakeClient``). Then the real
gateway app in front of a scripted loopback engine (``ScriptedEngine``, a test double):
every way an answer ends frees what the request held."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from registry import TENANT_SCOPE, Actor, LocalBlobStore, Registry
from server.app import create_app
from server.config import Settings
from server.gateway.fair_queue import UNSEATED, ClientGone, FairGate, QueueTimeout, Seat, Unseated
from server.gateway.metrics import Metrics
from server.gateway.replicas import Engine
from tests.registry.registry_testdata import build_tiny_base

ROOT = Actor("test-root", admin=True)
BASE = "base-fingerprint"
MAX_LEN = 1000
LONG = {"prompt": "x" * 1500, "max_tokens": 400}
"""Costs 900 tokens: 1,500 characters at 3 a token, and 400 to complete."""
SHORT = {"prompt": "hi", "max_tokens": 9}
"""Costs 10 tokens."""


class FakeClient:
    """A fake ASGI ``receive`` after the body was read: blocks until ``disconnect()``."""

    def __init__(self) -> None:
        self._gone = asyncio.Event()

    def disconnect(self) -> None:
        self._gone.set()

    async def __call__(self) -> dict[str, Any]:
        await self._gone.wait()
        return {"type": "http.disconnect"}


def gate(**settings: Any) -> FairGate:
    defaults: dict[str, Any] = {"engine_max_model_len": MAX_LEN, "fair_queue_timeout": 5.0}
    return FairGate(Settings(**{**defaults, **settings}), Metrics())


async def enter(
    fair: FairGate, tenant: str, body: dict[str, Any], client: FakeClient | None = None
) -> Seat | Unseated:
    return await fair.enter(tenant, BASE, 1, body, client or FakeClient())


def queued(fair: FairGate, tenant: str) -> float | None:
    return fair.metrics.registry.get_sample_value("loraplex_queued_requests", {"tenant": tenant})


def waits(fair: FairGate, tenant: str) -> float | None:
    return fair.metrics.registry.get_sample_value(
        "loraplex_queue_wait_seconds_count", {"tenant": tenant}
    )


def held(fair: FairGate) -> int:
    return sum(queue.in_flight for queue in fair._queues.values())


async def settle() -> None:
    for _ in range(5):  # woken waiters resume over a few loop turns
        await asyncio.sleep(0)


def test_cost_is_the_limits_estimate_capped_at_one_sequence_per_choice() -> None:
    fair = gate()
    assert fair.cost(LONG) == 900
    assert fair.cost({"prompt": "hi"}) == MAX_LEN  # no max_tokens: up to the context length
    assert fair.cost({"prompt": "hi", "n": 3}) == 3 * MAX_LEN
    assert fair.cost({"messages": [{"role": "user", "content": "x" * 30}], "max_tokens": 5}) > 15


def test_default_budgets_scale_with_the_pool() -> None:
    fair = gate()
    assert fair.replica_tokens == 16 * MAX_LEN
    assert fair.budget(fair.replica_tokens * 3) == 24 * MAX_LEN
    assert gate(tenant_max_in_flight_tokens=500).budget(10**6) == 500
    assert gate(engine_step_tokens=256).replica_prompt_tokens == 8 * 256
    assert fair.prompt_budget(3000) == 1500 and fair.prompt_budget(None) is None


async def test_a_tenant_over_its_budget_waits_and_a_quiet_one_goes_ahead() -> None:
    fair = gate(tenant_max_in_flight_tokens=1000)
    first = await enter(fair, "flood", LONG)
    second = asyncio.ensure_future(enter(fair, "flood", LONG))
    await settle()
    assert not second.done() and queued(fair, "flood") == 1
    quiet = await enter(fair, "quiet", SHORT)
    assert not quiet.waited and not second.done()
    quiet.release()
    await settle()
    assert not second.done()  # it waits for its own tenant's request, not the quiet one's
    first.release()
    seat = await asyncio.wait_for(second, 5)
    assert seat.waited and queued(fair, "flood") == 0 and waits(fair, "flood") == 2
    seat.release()
    seat.release()  # idempotent: released once
    assert held(fair) == 0


async def test_waiting_past_the_timeout_behind_its_own_budget_is_a_429() -> None:
    fair = gate(tenant_max_in_flight_tokens=1000, fair_queue_timeout=0.05)
    first = await enter(fair, "flood", LONG)
    with pytest.raises(QueueTimeout) as info:
        await enter(fair, "flood", LONG)
    error = info.value
    assert (error.status, error.code, error.reason) == (
        429,
        "rate_limit_exceeded",
        "in_flight_tokens",
    )
    assert error.headers == {"Retry-After": "1"}
    assert error.body()["error"]["type"] == "rate_limit_error"
    assert "900 tokens of your in-flight budget of 1000" in error.message
    assert held(fair) == 900 and queued(fair, "flood") == 0
    first.release()
    assert held(fair) == 0


async def test_waiting_past_the_timeout_behind_everyones_requests_is_a_503() -> None:
    fair = gate(engine_max_in_flight_tokens=900, fair_queue_timeout=0.05)
    running = await enter(fair, "a", LONG)
    with pytest.raises(QueueTimeout) as info:
        await enter(fair, "b", SHORT)  # within b's own budget, but the engines are full
    error = info.value
    assert (error.status, error.code) == (503, "engines_busy")
    assert error.headers == {"Retry-After": "2"}
    assert error.body()["error"]["type"] == "service_unavailable"
    running.release()
    assert held(fair) == 0


async def test_a_client_that_disconnects_while_waiting_holds_nothing() -> None:
    fair = gate(tenant_max_in_flight_tokens=1000)
    first = await enter(fair, "flood", LONG)
    client = FakeClient()
    gone = asyncio.ensure_future(enter(fair, "flood", LONG, client))
    after = asyncio.ensure_future(enter(fair, "flood", LONG))
    await settle()
    client.disconnect()
    with pytest.raises(ClientGone):
        await gone
    assert queued(fair, "flood") == 1
    first.release()
    seat = await asyncio.wait_for(after, 5)  # the withdrawn request took no turn
    seat.release()
    assert held(fair) == 0


async def test_a_cancelled_waiter_holds_nothing_even_if_its_turn_had_come() -> None:
    fair = gate(tenant_max_in_flight_tokens=1000)
    first = await enter(fair, "flood", LONG)
    waiting = asyncio.ensure_future(enter(fair, "flood", LONG))
    await settle()
    first.release()  # its turn comes; it is cancelled before it resumes
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert held(fair) == 0 and queued(fair, "flood") == 0


async def test_requests_wait_for_the_pool_in_turn_across_tenants() -> None:
    fair = gate(engine_max_in_flight_tokens=900)
    blocker = await enter(fair, "a", LONG)
    order: list[str] = []

    async def one(tenant: str, body: dict[str, Any]) -> None:
        seat = await enter(fair, tenant, body)
        order.append(tenant)
        await asyncio.sleep(0)
        seat.release()

    tasks = [asyncio.ensure_future(one("a", LONG)) for _ in range(3)]
    await settle()
    tasks += [asyncio.ensure_future(one("b", LONG)) for _ in range(3)]
    await settle()
    blocker.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    # a's requests came first, but a held the engines meanwhile: b starts, then they alternate.
    assert order == ["b", "a", "b", "a", "b", "a"]
    assert held(fair) == 0


async def test_with_fair_queueing_off_nothing_waits_or_is_held() -> None:
    fair = gate(fair_queueing=False, tenant_max_in_flight_tokens=1)
    seats = [await enter(fair, "flood", LONG) for _ in range(10)]
    assert all(seat is UNSEATED for seat in seats)
    assert fair._queues == {}


async def test_a_tenant_over_its_prompt_budget_waits_and_a_quiet_one_goes_ahead() -> None:
    fair = gate(engine_max_in_flight_prompt_tokens=2000)  # a tenant's prompts: 1,000 tokens
    long_prompt = {"prompt": "x" * 2400, "max_tokens": 10}  # 800 prompt tokens, 810 in all
    first = await enter(fair, "flood", long_prompt)
    second = asyncio.ensure_future(enter(fair, "flood", long_prompt))
    await settle()
    assert not second.done() and queued(fair, "flood") == 1  # its tokens fit; its prompt not
    quiet = await enter(fair, "quiet", long_prompt)
    assert not quiet.waited
    first.release()
    seat = await asyncio.wait_for(second, 5)
    for held_seat in (quiet, seat):
        held_seat.release()
    assert held(fair) == 0


async def test_past_the_timeout_behind_its_own_prompts_the_429_names_them() -> None:
    fair = gate(engine_max_in_flight_prompt_tokens=2000, fair_queue_timeout=0.05)
    long_prompt = {"prompt": "x" * 2400, "max_tokens": 10}
    first = await enter(fair, "flood", long_prompt)
    with pytest.raises(QueueTimeout) as info:
        await enter(fair, "flood", long_prompt)
    assert info.value.status == 429
    assert "and 800 prompt tokens of 1000; this one (810 tokens, 800 of them prompt)" in (
        info.value.message
    )
    first.release()


async def test_a_started_request_carries_its_tenants_priority_never_the_clients() -> None:
    fair = gate(engine_max_in_flight_tokens=10_000, tenant_max_in_flight_tokens=2000)
    bodies = [{**LONG, "priority": -100} for _ in range(3)]
    first, second = [await enter(fair, "flood", body) for body in bodies[:2]]
    third = asyncio.ensure_future(enter(fair, "flood", bodies[2]))  # over the flood's budget
    quiet_body = {**SHORT, "priority": 1_000_000}
    quiet = await enter(fair, "quiet", quiet_body)
    # 900 of the pool's 10,000 tokens held by the flood's first request: 9 %.
    assert [bodies[0]["priority"], bodies[1]["priority"], quiet_body["priority"]] == [0, 9, 0]
    await settle()
    assert not third.done() and bodies[2]["priority"] == -100  # not sent yet
    first.release()
    seat = await asyncio.wait_for(third, 5)
    assert seat.waited and bodies[2]["priority"] == 9  # as it starts, beside the second
    for held_seat in (second, quiet, seat):
        held_seat.release()


async def test_with_fair_queueing_off_a_clients_priority_is_dropped() -> None:
    fair = gate(fair_queueing=False)
    body = {**SHORT, "priority": -100}
    await enter(fair, "jumper", body)
    assert "priority" not in body  # the engine's default for every request: first come first


# -- through the gateway app: every way an answer ends frees its seat --------------------

SCRIPTS: dict[str, tuple[int, list[bytes]]] = {
    "ok": (200, [b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}']),
    "refused": (400, [b'{"error":{"message":"bad","type":"BadRequestError","code":400}}']),
    "failed": (500, [b"boom"]),
    "stream": (200, [b'data: {"choices":[{"text":"a"}]}\n\n', b"data: [DONE]\n\n"]),
}
"""Scripted engine answers, by prompt; "cut" sends half a body and hangs up, "slow" answers
"ok" after 3 s, anything else is malformed JSON."""


SLOW_ARRIVED = threading.Event()
RECEIVED: list[dict[str, Any]] = []
"""The bodies the scripted engine was sent, oldest first."""


class ScriptedEngine(http.server.BaseHTTPRequestHandler):
    """A loopback engine that answers each completion as its prompt names (a test double)."""

    def do_GET(self) -> None:  # /health: always up
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        RECEIVED.append(body)
        prompt = body["prompt"]
        if prompt == "slow":
            SLOW_ARRIVED.set()
            time.sleep(3)  # past the gateway's 1 s queue timeout
        status, parts = SCRIPTS.get(prompt, SCRIPTS["ok"] if prompt == "slow" else (200, [b"{"]))
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("connection", "close")
        if prompt != "cut":
            self.send_header("content-length", str(sum(map(len, parts))))
        else:
            self.send_header("content-length", "1000")
        self.end_headers()
        for part in parts:
            self.wfile.write(part)
            self.wfile.flush()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def app_client(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TestClient, dict[str, str]]]:
    tmp_path = tmp_path_factory.mktemp("fair-app")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ScriptedEngine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "b"))
    base = build_tiny_base(tmp_path / "tiny")
    record = registry.register_base(base, "tiny", "r1", ROOT)
    tenant = registry.create_tenant("acme", ROOT)
    assert tenant.id is not None
    _, key = registry.create_api_key(tenant.id, TENANT_SCOPE, ROOT)
    # Budget 1 token: any request runs alone, so a seat left held makes the next one wait
    # out the timeout and answer 429.
    settings = Settings(
        home=tmp_path, base_model=base, tenant_max_in_flight_tokens=1, fair_queue_timeout=1.0
    )
    engine = Engine(f"http://127.0.0.1:{server.server_port}", record.fingerprint, "tiny")
    with TestClient(create_app(settings, registry, engines=[engine])) as client:
        deadline = time.monotonic() + 30
        while not engine.healthy and time.monotonic() < deadline:
            time.sleep(0.1)  # two probes a second apart readmit it
        assert engine.healthy
        yield client, {"authorization": f"Bearer {key}"}
    server.shutdown()
    registry.close()


@pytest.mark.parametrize(
    ("prompt", "stream", "status"),
    [
        ("ok", False, 200),
        ("refused", False, 400),
        ("failed", False, 502),
        ("cut", False, 502),
        ("stream", True, 200),
        ("malformed", False, 502),
    ],
)
def test_every_ending_of_an_answer_frees_its_seat(
    app_client: tuple[TestClient, dict[str, str]], prompt: str, stream: bool, status: int
) -> None:
    client, auth = app_client
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 5, "stream": stream}
    for _ in range(3):  # each would wait out the timeout (429) behind a seat left held
        answer = client.post("/v1/completions", json=body, headers=auth)
        assert answer.status_code == status, answer.text
        answer.read()
    after = client.post("/v1/completions", json={**body, "prompt": "ok"}, headers=auth)
    assert after.status_code == 200, after.text


def test_a_request_waiting_past_the_timeout_gets_a_retryable_429_in_openai_shape(
    app_client: tuple[TestClient, dict[str, str]],
) -> None:
    client, auth = app_client
    body = {"model": "tiny", "prompt": "slow", "max_tokens": 5}
    SLOW_ARRIVED.clear()
    slow = threading.Thread(
        target=client.post, args=("/v1/completions",), kwargs={"json": body, "headers": auth}
    )
    slow.start()
    assert SLOW_ARRIVED.wait(10)  # in flight at the engine: the tenant's budget is held
    answer = client.post("/v1/completions", json={**body, "prompt": "ok"}, headers=auth)
    assert answer.status_code == 429, answer.text
    assert answer.headers["retry-after"] == "1"
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "in-flight budget of 1 and" in error["message"]
    slow.join(timeout=10)
    after = client.post("/v1/completions", json={**body, "prompt": "ok"}, headers=auth)
    assert after.status_code == 200, after.text  # the refused request held nothing


def test_the_engine_gets_the_gateways_priority_not_the_clients(
    app_client: tuple[TestClient, dict[str, str]],
) -> None:
    client, auth = app_client
    body = {"model": "tiny", "prompt": "ok", "max_tokens": 5, "priority": -1000}
    answer = client.post("/v1/completions", json=body, headers=auth)
    assert answer.status_code == 200, answer.text
    assert RECEIVED[-1]["priority"] == 0  # nothing else of its tenant's in flight
