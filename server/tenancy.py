"""Per-request answers from the registry: who is calling, what may they use, how much.

The registry is the source of truth; every gateway process keeps a short-lived
cache in front of it (``REGISTRY_TTL``) so a hot path costs no database round
trip, yet revoked keys, alias flips and new limits reach every process within
one second. Blocking database calls run in worker threads.

Usage for billing is summed in memory and written by one background flush per
second, not one write per request.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Generic, Literal, TypeVar

import router
from registry import Principal, Registry

log = logging.getLogger("loraplex.tenancy")

REGISTRY_TTL = 0.5
"""Seconds a cached registry answer is trusted; half the 1 s freshness promise."""

T = TypeVar("T")


class _Miss(enum.Enum):
    MISS = enum.auto()


MISS: Final = _Miss.MISS
"""What ``TTLCache.fresh`` answers for a key with no fresh value."""


class TTLCache(Generic[T]):
    """Values loaded on demand and kept for ``ttl`` seconds; bounded in size.

    Concurrent misses for one key share a single load, so an expiring entry
    under load costs one database query, not one per waiting request.
    """

    def __init__(self, ttl: float, max_entries: int = 50_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[object, tuple[float, T]] = {}
        self._loading: dict[object, asyncio.Future[T]] = {}

    def fresh(self, key: object) -> T | Literal[_Miss.MISS]:
        """The cached value if still fresh, else ``MISS``: a hit with no coroutine to run."""
        hit = self._entries.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return MISS

    async def get(self, key: object, load: Callable[[], Awaitable[T]]) -> T:
        hit = self.fresh(key)
        if hit is not MISS:
            return hit
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            value = await load()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            del self._loading[key]
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # rare; a cold second is cheaper than LRU bookkeeping
        self._entries[key] = (time.monotonic() + self.ttl, value)
        future.set_result(value)
        return value


@dataclass(frozen=True)
class Caller:
    """An authenticated tenant."""

    principal: Principal
    tenant_id: int
    tenant_name: str


class Tenancy:
    """The gateway's cached view of the registry."""

    def __init__(self, registry: Registry, ttl: float = REGISTRY_TTL) -> None:
        self.registry = registry
        self._principals: TTLCache[Caller | Principal | None] = TTLCache(ttl)
        self._routing: TTLCache[router.RoutingView | None] = TTLCache(ttl)
        self._limits: TTLCache[router.TenantLimits] = TTLCache(ttl)

    async def caller(self, token: str) -> Caller | Principal | None:
        """The tenant behind a key, the bare principal for admin keys, None if invalid."""
        hit = self._principals.fresh(token)  # the hot path: no closure, no second coroutine
        if hit is not MISS:
            return hit

        async def load() -> Caller | Principal | None:
            return await asyncio.to_thread(self._load_caller, token)

        return await self._principals.get(token, load)

    def _load_caller(self, token: str) -> Caller | Principal | None:
        principal = self.registry.authenticate(token)
        if principal is None or principal.tenant_id is None:
            return principal
        tenant = self.registry.get_tenant(principal.tenant_id)
        return Caller(principal, principal.tenant_id, tenant.name)

    async def routing(self, tenant_id: int, adapter: str) -> router.RoutingView | None:
        hit = self._routing.fresh((tenant_id, adapter))
        if hit is not MISS:
            return hit

        async def load() -> router.RoutingView | None:
            return await asyncio.to_thread(self._load_routing, tenant_id, adapter)

        return await self._routing.get((tenant_id, adapter), load)

    def _load_routing(self, tenant_id: int, adapter: str) -> router.RoutingView | None:
        view = self.registry.routing_view(tenant_id, adapter)
        if view is None:
            return None
        base_fingerprints = {b.id: b.fingerprint for b in self.registry.list_bases()}
        versions = {
            v.number: router.VersionView(
                v.number, v.engine_name, base_fingerprints[v.base_id], router.VersionState(v.state)
            )
            for v in view.versions
        }
        # The registry and the router never import each other; the gateway translates.
        aliases = {
            name: router.AliasTarget(target.version, target.weight)
            for name, target in view.aliases.items()
        }
        return router.RoutingView(view.name, versions, aliases)

    async def limits(self, tenant_id: int) -> router.TenantLimits:
        hit = self._limits.fresh(tenant_id)
        if hit is not MISS:
            return hit

        async def load() -> router.TenantLimits:
            stored = await asyncio.to_thread(self.registry.tenant_limits, tenant_id)
            return router.TenantLimits(
                requests_per_minute=stored.requests_per_minute,
                tokens_per_minute=stored.tokens_per_minute,
                max_concurrent=stored.max_concurrent,
                max_total_tokens=stored.max_total_tokens,
            )

        return await self._limits.get(tenant_id, load)


@dataclass
class _Counts:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class UsageBook:
    """Token usage per (tenant, adapter, version), flushed to the registry once a second."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._pending: defaultdict[tuple[int, str, int], _Counts] = defaultdict(_Counts)

    def add(self, tenant_id: int, adapter: str, version: int, prompt: int, completion: int) -> None:
        counts = self._pending[(tenant_id, adapter, version)]
        counts.requests += 1
        counts.prompt_tokens += prompt
        counts.completion_tokens += completion

    async def flush(self) -> None:
        pending, self._pending = self._pending, defaultdict(_Counts)
        for (tenant_id, adapter, version), counts in pending.items():
            try:
                await asyncio.to_thread(
                    self.registry.record_usage,
                    tenant_id,
                    adapter,
                    version,
                    requests=counts.requests,
                    prompt_tokens=counts.prompt_tokens,
                    completion_tokens=counts.completion_tokens,
                )
            except Exception:
                # Keep the counts for the next flush rather than lose billable usage.
                log.exception("could not record usage; will retry")
                kept = self._pending[(tenant_id, adapter, version)]
                kept.requests += counts.requests
                kept.prompt_tokens += counts.prompt_tokens
                kept.completion_tokens += counts.completion_tokens

    async def run(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.flush()
