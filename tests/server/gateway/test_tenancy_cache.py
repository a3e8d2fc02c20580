"""The gateway's cached view of the registry (server/gateway/tenancy.py): TTLCache, UsageBook."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry import Actor, LocalBlobStore, Registry, TenantLimits
from server.gateway.tenancy import MISS, Tenancy, TTLCache, UsageBook


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "blobs"))
    yield registry
    registry.close()


class Counter:
    """A loader that answers 1, 2, 3... and can be made slow or failing."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def __call__(self, key: str) -> int:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return self.calls


async def test_a_value_is_reused_within_its_ttl_and_reloaded_after() -> None:
    load = Counter()
    cache = TTLCache(load, ttl=0.05)
    assert cache.fresh("k") is MISS
    assert [await cache.get("k"), await cache.get("k")] == [1, 1]
    assert cache.fresh("k") == 1
    await asyncio.sleep(0.06)
    assert cache.fresh("k") is MISS  # no max_age: nothing stale is ever answered
    assert await cache.get("k") == 2


async def test_concurrent_misses_share_one_load() -> None:
    load = Counter(delay=0.01)
    cache = TTLCache(load, ttl=10)
    assert await asyncio.gather(*(cache.get("k") for _ in range(20))) == [1] * 20
    assert load.calls == 1


async def test_a_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    load = Counter(delay=0.01)
    load.fail = RuntimeError("db down")
    cache = TTLCache(load, ttl=10)
    results = await asyncio.gather(*(cache.get("k") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    load.fail = None
    assert await cache.get("k") == 2


async def test_a_stale_value_is_answered_at_once_while_one_reload_runs() -> None:
    load = Counter()
    cache = TTLCache(load, ttl=0.01, max_age=10)
    assert await cache.get("k") == 1
    load.gate = asyncio.Event()  # the reload hangs until the gate opens
    await asyncio.sleep(0.02)
    stale = [await asyncio.wait_for(cache.get("k"), timeout=5) for _ in range(50)]
    assert stale == [1] * 50
    load.gate.set()
    await asyncio.sleep(0.01)
    assert load.calls == 2  # fifty stale hits started a single reload
    assert cache.fresh("k") == 2


async def test_past_max_age_callers_wait_for_the_reload() -> None:
    load = Counter(delay=0.01)
    cache = TTLCache(load, ttl=0.01, max_age=0.03)
    assert await cache.get("k") == 1
    await asyncio.sleep(0.04)
    assert cache.fresh("k") is MISS
    assert await cache.get("k") == 2


async def test_a_failed_background_reload_keeps_the_value_until_max_age() -> None:
    load = Counter(delay=0.005)
    cache = TTLCache(load, ttl=0.01, max_age=0.1)
    assert await cache.get("k") == 1
    load.fail = RuntimeError("db down")
    await asyncio.sleep(0.02)
    assert cache.fresh("k") == 1  # starts the reload, which fails
    await asyncio.sleep(0.02)
    assert await cache.get("k") == 1
    await asyncio.sleep(0.1)
    try:
        await cache.get("k")
    except RuntimeError:
        pass
    else:
        raise AssertionError("a value past max_age was answered while its reload failed")


async def test_a_caller_that_goes_away_does_not_cancel_the_shared_load() -> None:
    load = Counter(delay=0.02)
    cache = TTLCache(load, ttl=10)
    first = asyncio.ensure_future(cache.get("k"))
    second = asyncio.ensure_future(cache.get("k"))
    await asyncio.sleep(0.005)
    first.cancel()
    assert await second == 1
    assert load.calls == 1


async def test_tenancy_sees_a_revoked_key_within_max_age(registry: Registry) -> None:
    actor = Actor("ops", admin=True)
    tenant = registry.create_tenant("acme", actor, TenantLimits())
    record, key = registry.create_api_key(tenant.id, "tenant", actor, name="k")
    tenancy = Tenancy(registry, ttl=0.02, max_age=0.1)
    caller = await tenancy.caller(key)
    assert caller is not None and getattr(caller, "tenant_name", "") == "acme"
    assert record.id is not None
    registry.revoke_api_key(record.id, actor)
    await asyncio.sleep(0.11)
    assert await tenancy.caller(key) is None


async def test_usage_is_flushed_in_one_batch_and_kept_when_the_write_fails(
    registry: Registry,
) -> None:
    actor = Actor("ops", admin=True)
    tenant = registry.create_tenant("acme", actor, TenantLimits())
    book = UsageBook(registry)
    book.add(tenant.id, "bot", 1, 10, 5)
    book.add(tenant.id, "bot", 1, 1, 1)
    book.add(tenant.id, "", 0, 7, 0)
    real = registry.record_usage
    registry.record_usage = _failing  # type: ignore[method-assign]
    await book.flush()
    assert registry.usage(tenant.id) == []
    registry.record_usage = real  # type: ignore[method-assign]
    await book.flush()
    rows = {(u.adapter, u.version): u for u in registry.usage(tenant.id, dt.date.min)}
    assert (rows["bot", 1].requests, rows["bot", 1].prompt_tokens) == (2, 11)
    assert (rows["", 0].requests, rows["", 0].prompt_tokens) == (1, 7)


def _failing(*args: object, **kwargs: object) -> None:
    raise OSError("database is down")


async def test_a_version_pushed_since_the_view_was_cached_resolves_at_once(
    registry: Registry, tmp_path: Path
) -> None:
    from server.errors import APIError
    from server.gateway.resolution import Resolver
    from server.gateway.tenancy import Caller
    from tests.registry.registry_testdata import build_adapter, build_tiny_base

    actor = Actor("ops", admin=True)
    tenant = registry.create_tenant("acme", actor, TenantLimits())
    assert tenant.id is not None
    base = build_tiny_base(tmp_path / "tiny")
    registry.register_base(base, "tiny", "r1", actor)
    adapters = [build_adapter(base, tmp_path / f"v{n}", seed=n) for n in (1, 2)]
    registry.push_adapter(tenant.id, "bot", adapters[0], "tiny", actor)
    registry.promote(tenant.id, "bot", 1, actor)
    _, key = registry.create_api_key(tenant.id, "tenant", actor, name="k")
    tenancy = Tenancy(registry, ttl=60, max_age=60)  # nothing expires during the test
    caller = await tenancy.caller(key)
    assert isinstance(caller, Caller)
    resolver = Resolver(tenancy, {"tiny": "fp"}, lambda: False)
    assert (await resolver.resolve(caller, {"model": "bot"})).version.number == 1  # type: ignore[union-attr]
    registry.push_adapter(tenant.id, "bot", adapters[1], "tiny", actor)
    await asyncio.sleep(0.06)  # older than RELOAD_AFTER
    pinned = await resolver.resolve(caller, {"model": "bot@2"})
    assert pinned.version is not None and pinned.version.number == 2
    with pytest.raises(APIError) as unknown:
        await resolver.resolve(caller, {"model": "bot@3"})
    assert unknown.value.status == 404 and "bot@3" in str(unknown.value)
