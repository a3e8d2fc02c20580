"""The Redis-backed tenant limiter against a real Redis (127.0.0.1:6379; fails, never skips,
if it is unreachable): the same answers as ``router.Limiter``, one budget for two gateways,
leases that lapse, and Redis down, frozen or back.

Each test uses its own key prefix and deletes it. The outage tests stop and freeze a
private ``redis-server`` of their own, never the machine's.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
import redis.asyncio
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter

import router
from registry import TENANT_SCOPE, Actor, LocalBlobStore, Registry, TenantLimits
from server.app import create_app
from server.config import Settings, SettingsError, load_settings
from server.dev.fleet import free_port
from server.dev.process import Process
from server.errors import APIError
from server.gateway.accounting import Accounting
from server.gateway.metrics import Metrics
from server.gateway.replicas import Engine
from server.gateway.shared_limits import LimitsUnavailable, SharedAdmission, SharedLimiter
from server.gateway.tenancy import Caller
from tests.registry.registry_testdata import build_tiny_base

REDIS_URL = "redis://127.0.0.1:6379/0"
TIMEOUT = 0.05


def errors_counter() -> Counter:
    return Counter("errors", "store errors", ["operation"], registry=CollectorRegistry())


def limiter_on(client: redis.asyncio.Redis, prefix: str, **options: Any) -> SharedLimiter:
    return SharedLimiter(
        client, router.Limiter(), errors_counter(), timeout=TIMEOUT, prefix=prefix, **options
    )


def from_settings(settings: Settings, local: router.Limiter, errors: Counter) -> SharedLimiter:
    shared = SharedLimiter.from_settings(settings, local, errors)
    assert shared is not None
    return shared


def client_for(url: str) -> redis.asyncio.Redis:
    settings = Settings(redis_url=url, redis_timeout=TIMEOUT)
    return from_settings(settings, router.Limiter(), errors_counter()).client


@pytest.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    shared = redis.asyncio.from_url(REDIS_URL)
    assert await shared.ping(), f"Redis at {REDIS_URL} does not answer"
    yield shared
    await shared.aclose()


@pytest.fixture
async def prefix(client: redis.asyncio.Redis) -> AsyncIterator[str]:
    name = f"loraplex:test:{secrets.token_hex(6)}"
    yield name
    keys = [key async for key in client.scan_iter(f"{name}:*")]
    if keys:
        await client.delete(*keys)


async def admitted(limiter: SharedLimiter, limits: router.TenantLimits, tokens: int = 1) -> Any:
    decision = await limiter.check("t1", limits, tokens)
    assert not isinstance(decision, router.Denied), decision
    return decision


async def denied(limiter: SharedLimiter, limits: router.TenantLimits, tokens: int = 1) -> Any:
    decision = await limiter.check("t1", limits, tokens)
    assert isinstance(decision, router.Denied), decision
    return decision


# -- the same answers as router.Limiter ------------------------------------------------------

RPM = router.TenantLimits(requests_per_minute=3)
TPM = router.TenantLimits(tokens_per_minute=1000)


async def test_requests_per_minute_match_the_local_limiter(
    client: redis.asyncio.Redis, prefix: str
) -> None:
    shared = limiter_on(client, prefix)
    for _ in range(3):
        shared.settle(await admitted(shared, RPM), 1)
    refusal = await denied(shared, RPM)
    local = router.Limiter()
    for _ in range(3):
        local.check("t1", RPM, 1, 0.0)
    expected = local.check("t1", RPM, 1, 0.0)
    assert isinstance(expected, router.Denied)
    assert refusal.reason is expected.reason is router.DenyReason.REQUESTS_PER_MINUTE
    assert refusal.retry_after_seconds == pytest.approx(expected.retry_after_seconds, abs=0.2)
    assert refusal.message.startswith("over your requests per minute limit; retry in ")
    # No shared counts: nothing of it was kept in this gateway's memory.
    assert shared.local.in_flight("t1") == 0


async def test_tokens_are_charged_up_front_and_settled_with_the_actual_count(
    client: redis.asyncio.Redis, prefix: str
) -> None:
    shared = limiter_on(client, prefix)
    first = await admitted(shared, TPM, 600)
    refusal = await denied(shared, TPM, 600)
    assert refusal.reason is router.DenyReason.TOKENS_PER_MINUTE
    assert refusal.retry_after_seconds == pytest.approx(12.0, abs=0.1)
    shared.settle(first, 100)  # 500 refunded
    await shared.drain()
    shared.settle(await admitted(shared, TPM, 600), 600)
    await denied(shared, TPM, 400)
    owed = await admitted(shared, TPM, 300)
    shared.settle(owed, 1300)  # the engine counted 1,000 more than asked: owed
    await shared.drain()
    assert (await denied(shared, TPM, 1)).retry_after_seconds == pytest.approx(60.06, abs=0.2)


async def test_requests_too_long_for_a_limit_are_refused_without_redis(prefix: str) -> None:
    nowhere = limiter_on(client_for(f"redis://127.0.0.1:{free_port()}/0"), prefix)
    limits = router.TenantLimits(max_total_tokens=100, tokens_per_minute=1000)
    refusal = await denied(nowhere, limits, 101)
    assert refusal.retry_after_seconds is None and refusal.reason.value == "max_total_tokens"
    assert nowhere.outage.down_since is None  # Redis was never asked


# -- concurrency leases ------------------------------------------------------------------------

CAP = router.TenantLimits(max_concurrent=2)


async def test_concurrency_is_counted_in_leases_returned_on_settling(
    client: redis.asyncio.Redis, prefix: str
) -> None:
    shared = limiter_on(client, prefix)
    first, _ = await admitted(shared, CAP), await admitted(shared, CAP)
    refusal = await denied(shared, CAP)
    assert refusal.reason is router.DenyReason.MAX_CONCURRENT
    assert refusal.retry_after_seconds == router.limits.CONCURRENCY_RETRY_AFTER
    assert (
        refusal.message
        == "2 of your requests are in flight, your limit is 2: wait for one to finish"
    )
    shared.settle(first, 1)
    await shared.drain()
    await admitted(shared, CAP)
    with pytest.raises(router.AlreadySettled):
        shared.settle(first, 1)


async def test_leases_lapse_unless_renewed(client: redis.asyncio.Redis, prefix: str) -> None:
    renewing = limiter_on(client, prefix, lease_ttl=0.6)
    await admitted(renewing, CAP)
    dead = limiter_on(client, prefix, lease_ttl=0.6)  # a gateway that stops renewing
    await admitted(dead, CAP)
    await denied(renewing, CAP)
    for _ in range(4):
        await asyncio.sleep(0.25)
        await renewing.renew()
    # 1 s on: the dead gateway's lease lapsed, the renewed one did not.
    await admitted(renewing, CAP)
    await denied(renewing, CAP)
    assert await client.ttl(f"{prefix}:{{t1}}:leases") <= 1  # idle tenants cost nothing


async def test_two_gateways_share_one_budget(client: redis.asyncio.Redis, prefix: str) -> None:
    gateways = [limiter_on(client, prefix), limiter_on(client, prefix)]
    limits = router.TenantLimits(requests_per_minute=5, max_concurrent=10)
    answers = [await gateways[i % 2].check("t1", limits, 1) for i in range(10)]
    assert [not isinstance(a, router.Denied) for a in answers] == [True] * 5 + [False] * 5
    assert all(isinstance(a, SharedAdmission) for a in answers[:5])


# -- two gateway apps on one registry and one Redis --------------------------------------------

APP_REDIS_URL = "redis://127.0.0.1:6379/12"
"""The apps' keys are not prefixed per test: a database of this test's own, cleared."""
ROOT = Actor("test-root", admin=True)


@pytest.fixture
def two_gateways(tmp_path: Path) -> Iterator[tuple[list[TestClient], dict[str, Any]]]:
    store = sync_redis.Redis.from_url(APP_REDIS_URL)
    for key in store.scan_iter("loraplex:limits:*"):
        store.delete(key)
    base = build_tiny_base(tmp_path / "tiny")
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "b"))
    record = registry.register_base(base, "tiny", "r1", ROOT)
    tenant = registry.create_tenant("acme", ROOT, TenantLimits(requests_per_minute=2))
    assert tenant.id is not None
    _, key = registry.create_api_key(tenant.id, TENANT_SCOPE, ROOT)
    settings = Settings(home=tmp_path, base_model=base, redis_url=APP_REDIS_URL)
    name = settings.resolved_served_model_name
    silent = [Engine("http://127.0.0.1:9", record.fingerprint, name) for _ in range(2)]
    apps = [create_app(settings, registry, engines=[engine]) for engine in silent]
    request = {
        "json": {"model": settings.resolved_served_model_name, "prompt": "hi", "max_tokens": 1},
        "headers": {"authorization": f"Bearer {key}"},
    }
    with TestClient(apps[0]) as first, TestClient(apps[1]) as second:
        yield [first, second], request
    registry.close()
    for key in store.scan_iter("loraplex:limits:*"):
        store.delete(key)
    store.close()


def test_two_gateway_apps_admit_one_quota(
    two_gateways: tuple[list[TestClient], dict[str, Any]],
) -> None:
    clients, request = two_gateways
    answers = [clients[i % 2].post("/v1/completions", **request) for i in range(6)]
    # Admitted, then no engine to take it (503); past the shared quota of 2, 429.
    assert [a.status_code for a in answers] == [503, 503, 429, 429, 429, 429]
    refused = answers[2]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1


# -- Redis down, frozen, back ------------------------------------------------------------------


@dataclass
class PrivateRedis:
    """A ``redis-server`` of the test's own, to stop, freeze and start again."""

    process: Process
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process.start().wait_ready(self._pings, timeout=10, interval=0.05)

    def signal(self, sig: signal.Signals) -> None:
        assert self.process.popen is not None
        self.process.popen.send_signal(sig)

    def _pings(self) -> bool:
        return bool(sync_redis.Redis(port=self.port, socket_timeout=1).ping())


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    port = free_port()
    command = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
    server = PrivateRedis(Process("redis-server", command, tmp_path / "redis.log", grace=5), port)
    server.start()
    yield server
    server.signal(signal.SIGCONT)
    server.process.stop()


def failures(counter: Counter, operation: str) -> float:
    """The store errors ``counter`` counted for ``operation``."""
    return sum(
        sample.value
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels == {"operation": operation}
    )


async def test_redis_down_falls_back_to_local_limits_and_recovers(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    shared = limiter_on(client_for(private_redis.url), "loraplex:limits")
    limits = router.TenantLimits(requests_per_minute=2)
    assert isinstance(await shared.check("t1", limits, 1), SharedAdmission)
    private_redis.process.stop()
    caplog.set_level(logging.INFO, "loraplex.limits")
    answers = []
    for _ in range(4):
        started = time.perf_counter()
        answers.append(await shared.check("t1", limits, 1))
        # Bounded (redis-py's own default is no timeout); the margin is for a loaded host.
        assert time.perf_counter() - started < TIMEOUT + 0.5
    # This gateway's own count: 2 a minute, from scratch.
    assert [type(a) for a in answers] == [router.Admission] * 2 + [router.Denied] * 2
    assert failures(shared.outage.errors, "admit") == 1  # then paused for 1 s
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

    private_redis.start()
    await asyncio.sleep(1.0)  # the pause after the failure
    assert isinstance(await shared.check("t1", limits, 1), SharedAdmission)
    assert shared.outage.down_since is None
    assert "answers again" in caplog.text
    await shared.client.aclose()


async def test_frozen_redis_refuses_with_503_within_the_timeout(
    private_redis: PrivateRedis,
) -> None:
    settings = Settings(
        redis_url=private_redis.url,
        redis_timeout=TIMEOUT,
        limits_on_redis_failure="refuse",
    )
    metrics = Metrics()
    local = router.Limiter()
    shared = from_settings(settings, local, metrics.limit_store_errors)
    accounting = Accounting(local, None, metrics, 4096, shared)  # type: ignore[arg-type]
    caller = Caller(None, 7, "acme")  # type: ignore[arg-type]
    body = {"model": "m", "prompt": "hi", "max_tokens": 4}
    limits = router.TenantLimits(requests_per_minute=100)
    assert isinstance(await accounting.admit(caller, limits, body), SharedAdmission)
    private_redis.signal(signal.SIGSTOP)
    try:
        started = time.perf_counter()
        with pytest.raises(APIError) as refused:
            await accounting.admit(caller, limits, body)
        # Bounded (redis-py's own default is no timeout); the margin is for a loaded host.
        assert time.perf_counter() - started < TIMEOUT + 0.5
    finally:
        private_redis.signal(signal.SIGCONT)
    error = refused.value
    assert (error.status, error.code, error.headers) == (
        503,
        "limits_unavailable",
        {"Retry-After": "1"},
    )
    with pytest.raises(APIError):  # paused: refused at once, Redis not asked
        await accounting.admit(caller, limits, body)
    assert failures(metrics.limit_store_errors, "admit") == 1
    # Recovery without a restart: once the pause is over Redis is asked again. A resumed
    # process on a loaded host can miss the 50 ms timeout a few more times; each miss pauses 1 s.
    deadline = time.monotonic() + 10
    while True:
        await asyncio.sleep(1.0)
        try:
            admitted = await accounting.admit(caller, limits, body)
            break
        except APIError:
            if time.monotonic() > deadline:
                raise
    assert isinstance(admitted, SharedAdmission)
    await shared.close()


async def test_an_unreachable_redis_refuses_when_set_to(prefix: str) -> None:
    nowhere = limiter_on(
        client_for(f"redis://127.0.0.1:{free_port()}/0"), prefix, refuse_on_failure=True
    )
    with pytest.raises(LimitsUnavailable, match="retry in 1 s"):
        await nowhere.check("t1", RPM, 1)


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:6379/0", "is not a redis:// or rediss:// URL"),
        ("redis://127.0.0.1:port/0", "has no valid port"),
        ("redis:///0", "names no host"),
        ("redis://127.0.0.1:6379/zero", "the database after the host must be a number"),
    ],
)
def test_redis_settings_are_checked(url: str, problem: str) -> None:
    with pytest.raises(SettingsError, match=problem):
        load_settings(environ={"LORAPLEX_REDIS_URL": url})


def test_the_failure_mode_is_a_choice_and_no_url_means_local_limits() -> None:
    with pytest.raises(SettingsError, match="is not one of local, refuse"):
        load_settings(environ={"LORAPLEX_LIMITS_ON_REDIS_FAILURE": "open"})
    assert load_settings(environ={"LORAPLEX_REDIS_URL": REDIS_URL}).redis_url == REDIS_URL
    assert SharedLimiter.from_settings(Settings(), router.Limiter(), errors_counter()) is None
