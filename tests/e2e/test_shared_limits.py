"""Tenant limits shared by two gateways through one Redis, on the real engine.

Two more ``loraplex serve`` processes run in front of the session's engine (through a
pausable relay, ``tests/e2e/relay.py``), on its registry, both counting limits in the
machine's Redis (127.0.0.1:6379, a database of this test's own, cleared before and
after; fails, never skips, if Redis is down). A tenant alternating between them gets
its quota once, not once per gateway. Redis outages are covered in
tests/server/gateway/test_shared_limits.py.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import openai
import pytest
import redis
from openai import OpenAI

from registry import Registry, TenantLimits
from tests.e2e.conftest import OPERATOR, TenantKeys, make_tenant
from tests.e2e.probes import gateway_on_engine
from tests.e2e.relay import Relay
from tests.e2e.serving import ServeProcess, shared_registry_env

REDIS_URL = "redis://127.0.0.1:6379/13"
"""A database of this test's own: the gateways' keys are not prefixed per test."""


def _clear(client: redis.Redis) -> None:
    keys = list(client.scan_iter("loraplex:limits:*"))
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="module")
def limits_store() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    assert client.ping(), f"Redis at {REDIS_URL} does not answer"
    _clear(client)
    yield client
    _clear(client)
    client.close()


@pytest.fixture(scope="module")
def relay(gateway: ServeProcess, engine_port: int) -> Iterator[Relay]:
    """Between the two gateways and the session's engine (``gateway``: it is running)."""
    started = Relay(engine_port).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def gateways(
    gateway: ServeProcess,
    relay: Relay,
    engine_key: str,
    base_name: str,
    limits_store: redis.Redis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[ServeProcess]]:
    env = {**shared_registry_env(gateway), "LORAPLEX_REDIS_URL": REDIS_URL}
    args = ["--served-model-name", base_name]
    started: list[ServeProcess] = []
    try:
        for name in ("a", "b"):
            home = tmp_path_factory.mktemp(f"limits-{name}")
            started.append(gateway_on_engine(home, relay.port, engine_key, args, env))
        for serve in started:
            serve.wait_ready(timeout=120)
        yield started
    finally:
        for serve in started:
            assert serve.stop(), serve.log_tail()


def _tenant(registry: Registry, limits: TenantLimits) -> TenantKeys:
    tenant = make_tenant(registry, f"shared-{secrets.token_hex(3)}")
    registry.set_tenant_limits(tenant.tenant_id, limits, OPERATOR)
    return tenant


def _clients(gateways: list[ServeProcess], tenant: TenantKeys) -> list[OpenAI]:
    return [
        OpenAI(base_url=g.url + "/v1", api_key=tenant.key, max_retries=0, timeout=120)
        for g in gateways
    ]


def test_requests_per_minute_hold_across_two_gateways(
    gateways: list[ServeProcess], registry: Registry, base_name: str
) -> None:
    clients = _clients(gateways, _tenant(registry, TenantLimits(requests_per_minute=30)))
    served, retry_afters = 0, []
    started = time.monotonic()
    for i in range(60):
        try:
            clients[i % 2].completions.create(model=base_name, prompt="x", max_tokens=1)
            served += 1
        except openai.RateLimitError as exc:
            retry_afters.append(int(exc.response.headers["retry-after"]))
    elapsed = time.monotonic() - started
    # The bucket refills half a request a second while the 60 run: 31 if they take 2 s.
    assert 30 <= served <= 31 + int(elapsed / 2), (served, elapsed)
    assert len(retry_afters) == 60 - served and min(retry_afters) >= 1
    print(f"\n[shared limits] 30 rpm over 2 gateways: {served} of 60 served in {elapsed:.1f} s")


def test_tokens_per_minute_hold_across_two_gateways(
    gateways: list[ServeProcess], registry: Registry, base_name: str
) -> None:
    clients = _clients(gateways, _tenant(registry, TenantLimits(tokens_per_minute=600)))
    used, refused = 0, 0
    started = time.monotonic()
    for i in range(60):  # about 22 tokens each: 1,300 asked of a 600-token minute
        try:
            reply = clients[i % 2].completions.create(model=base_name, prompt="x", max_tokens=20)
            assert reply.usage is not None
            used += reply.usage.total_tokens
        except openai.RateLimitError as exc:
            assert int(exc.response.headers["retry-after"]) >= 1
            refused += 1
    elapsed = time.monotonic() - started
    # Settled with the engine's counts: what was served fits one minute's allowance, plus
    # its refill (10 tokens a second) and one request past the edge; one per gateway is 1,200.
    assert refused and used <= 600 + 10 * elapsed + 25, (used, refused, elapsed)


def test_concurrency_holds_across_two_gateways(
    gateways: list[ServeProcess], relay: Relay, registry: Registry, base_name: str
) -> None:
    clients = _clients(gateways, _tenant(registry, TenantLimits(max_concurrent=2)))
    # Streams that outlast the checks (the demo base would stop early at its end-of-text).
    slow = {"max_tokens": 600, "stream": True, "extra_body": {"ignore_eos": True}}
    streams = [c.completions.create(model=base_name, prompt="x", **slow) for c in clients]
    try:
        for stream in streams:
            next(iter(stream))  # in flight: the first event arrived
        # However fast the engine is, neither stream can end while the relay holds it.
        with relay.paused():
            for client in clients:
                with pytest.raises(openai.RateLimitError) as refused:
                    client.completions.create(model=base_name, prompt="x", max_tokens=1)
                assert int(refused.value.response.headers["retry-after"]) >= 1
                assert "2 of your requests are in flight" in refused.value.message
    finally:
        for stream in streams:
            stream.close()
    # Closing the streams ends both requests; their leases go back within moments.
    deadline = time.monotonic() + 10
    while True:
        try:
            clients[0].completions.create(model=base_name, prompt="x", max_tokens=1)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the leases of closed streams were not returned"
            time.sleep(0.2)
