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
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Final, Generic, Literal, TypeVar

import router
from registry import Principal, Registry, latency
from server.errors import APIError, bearer_token, incorrect_api_key

log = logging.getLogger("loraplex.tenancy")

REGISTRY_TTL = 0.5
"""Seconds a cached registry answer is used as it is; the first request after that starts
one reload in the background and is answered from the cache meanwhile."""
REGISTRY_MAX_AGE = 0.9
"""Seconds after which a cached answer is never used: requests wait for the reload. Below
the 1 s freshness promise (revoked keys, alias flips, new limits), load time included."""
RELOAD_AFTER = 0.05
"""Seconds a cached routing view is trusted even for a version it does not hold: at most
this often per adapter does a request for a version that may be new read the registry."""

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class _Miss(enum.Enum):
    MISS = enum.auto()


MISS: Final = _Miss.MISS
"""What ``TTLCache.fresh`` answers for a key with no usable value."""


class TTLCache(Generic[K, T]):
    """Values loaded on demand by ``loader``, refreshed ahead of use; bounded in size.

    A value is used as it is for ``ttl`` seconds, then for up to ``max_age``
    while one background reload replaces it: under steady traffic no request
    waits for the database, and a slow or stalled reload delays nobody until
    the value is ``max_age`` old. Past that (a key not asked for in a while)
    the caller waits, and concurrent misses for one key share a single load.
    Ages count from the start of the load that produced the value.
    """

    def __init__(
        self,
        loader: Callable[[K], Awaitable[T]],
        ttl: float,
        max_age: float | None = None,
        max_entries: int = 50_000,
    ) -> None:
        self.loader = loader
        self.ttl = ttl
        self.max_age = ttl if max_age is None else max(ttl, max_age)
        self.max_entries = max_entries
        self._entries: dict[K, tuple[float, T]] = {}
        self._loading: dict[K, asyncio.Future[T]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def fresh(self, key: K) -> T | Literal[_Miss.MISS]:
        """The cached value if still usable, else ``MISS``: a hit with no coroutine to run.

        A value past ``ttl`` is still answered, and its reload started.
        """
        hit = self._entries.get(key)
        if hit is None:
            return MISS
        age = time.monotonic() - hit[0]
        if age < self.ttl:
            return hit[1]
        if age < self.max_age:
            if key not in self._loading:
                self._start_load(key)
            return hit[1]
        return MISS

    def age(self, key: K) -> float | None:
        """Seconds since the load of the cached value started; None if none is cached."""
        hit = self._entries.get(key)
        return None if hit is None else time.monotonic() - hit[0]

    async def get(self, key: K) -> T:
        hit = self.fresh(key)
        return hit if hit is not MISS else await self.load(key)

    async def load(self, key: K) -> T:
        """Wait for the key's load (the one running, or a new one), whatever is cached."""
        pending = self._loading.get(key) or self._start_load(key)
        # Shielded: a caller that goes away does not cancel the load the others wait for.
        return await asyncio.shield(pending)

    def _start_load(self, key: K) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._loading[key] = future
        task = loop.create_task(self._run_load(key, future))
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)
        return future

    async def _run_load(self, key: K, future: asyncio.Future[T]) -> None:
        started = time.monotonic()
        try:
            value = await self.loader(key)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            if key in self._entries:
                log.warning("registry reload failed; the cached answer is kept: %r", exc)
            future.set_exception(exc)
            future.exception()  # retrieved: a background reload has no waiter to re-raise it
            return
        finally:
            del self._loading[key]
        if len(self._entries) >= self.max_entries and key not in self._entries:
            self._entries.clear()  # rare; a cold second is cheaper than LRU bookkeeping
        self._entries[key] = (started, value)
        future.set_result(value)


@dataclass(frozen=True)
class Caller:
    """An authenticated tenant."""

    principal: Principal
    tenant_id: int
    tenant_name: str


class Tenancy:
    """The gateway's cached view of the registry.

    Each answer is a ``TTLCache`` hit; the blocking registry calls behind the
    loaders run in worker threads.
    """

    def __init__(
        self, registry: Registry, ttl: float = REGISTRY_TTL, max_age: float = REGISTRY_MAX_AGE
    ) -> None:
        self.registry = registry
        self._principals = TTLCache(_in_thread(self._load_caller), ttl, max_age)
        self._routing = TTLCache(_in_thread(self._load_routing), ttl, max_age)
        self._limits = TTLCache(_in_thread(self._load_limits), ttl, max_age)
        self._servable = TTLCache(self._load_servable, ttl, max_age)
        self._base_names = TTLCache(_in_thread(self._load_base_names), ttl, max_age)
        self._bases: dict[int, str] = {}

    async def authenticate(self, header: str) -> Caller:
        """The tenant behind an ``Authorization`` header value, or the 401/403 APIError."""
        caller = await self.caller(bearer_token(header))
        if caller is None:
            raise incorrect_api_key()
        if not isinstance(caller, Caller):
            raise APIError(
                403,
                "Admin keys cannot be used for inference; use a tenant's key.",
                code="admin_key_not_allowed",
            )
        return caller

    async def caller(self, token: str) -> Caller | Principal | None:
        """The tenant behind a key, the bare principal for admin keys, None if invalid."""
        hit = self._principals.fresh(token)  # the hot path: no second coroutine on a hit
        return hit if hit is not MISS else await self._principals.load(token)

    async def routing(self, tenant_id: int, adapter: str) -> router.RoutingView | None:
        hit = self._routing.fresh((tenant_id, adapter))
        return hit if hit is not MISS else await self._routing.load((tenant_id, adapter))

    async def routing_now(self, tenant_id: int, adapter: str) -> router.RoutingView | None:
        """The adapter's routing as the registry has it now, unless the cached view is
        younger than ``RELOAD_AFTER``: for a request naming a version the cached view does
        not hold yet (pushed within the cache's lifetime), not for every request."""
        key = (tenant_id, adapter)
        age = self._routing.age(key)
        if age is not None and age < RELOAD_AFTER:
            return await self.routing(tenant_id, adapter)
        return await self._routing.load(key)

    async def limits(self, tenant_id: int) -> router.TenantLimits:
        hit = self._limits.fresh(tenant_id)
        return hit if hit is not MISS else await self._limits.load(tenant_id)

    async def registered_base_names(self) -> frozenset[str]:
        """The names of every registered base, whether or not an engine here serves it."""
        return await self._base_names.get(None)

    def _load_base_names(self, _: None) -> frozenset[str]:
        return frozenset(b.name for b in self.registry.list_bases())

    async def servable_adapters(self, tenant_id: int) -> list[tuple[str, str]]:
        """(name, base fingerprint of its production version) of each of the tenant's
        adapters that resolves to a version right now."""
        return await self._servable.get(tenant_id)

    async def _load_servable(self, tenant_id: int) -> list[tuple[str, str]]:
        adapters = await asyncio.to_thread(self.registry.list_adapters, tenant_id)
        names = [a.name for a in adapters]
        views = [await self.routing(tenant_id, name) for name in names]
        servable = []
        for name, view in zip(names, views, strict=True):
            target = view.aliases.get(router.PRODUCTION) if view else None
            version = view.versions.get(target.version) if view and target else None
            if version is not None:
                servable.append((name, version.base_fingerprint))
        return servable

    def _load_caller(self, token: str) -> Caller | Principal | None:
        principal = self.registry.authenticate(token)
        if principal is None or principal.tenant_id is None:
            return principal
        tenant = self.registry.get_tenant(principal.tenant_id)
        return Caller(principal, principal.tenant_id, tenant.name)

    def _load_routing(self, key: tuple[int, str]) -> router.RoutingView | None:
        view = self.registry.routing_view(*key)
        if view is None:
            return None
        base_fingerprints = self._base_fingerprints({v.base_id for v in view.versions})
        versions = {
            v.number: router.VersionView(
                v.number, v.lora_name, base_fingerprints[v.base_id], router.VersionState(v.state)
            )
            for v in view.versions
        }
        # The registry and the router never import each other; the gateway translates.
        aliases = {
            name: router.AliasTarget(target.version, target.weight)
            for name, target in view.aliases.items()
        }
        return router.RoutingView(view.name, versions, aliases)

    def _base_fingerprints(self, needed: set[int]) -> dict[int, str]:
        """Fingerprints by base id. A base record never changes: read again only for new ones."""
        if not needed <= self._bases.keys():
            self._bases = {b.id: b.fingerprint for b in self.registry.list_bases() if b.id}
        return self._bases

    def _load_limits(self, tenant_id: int) -> router.TenantLimits:
        stored = self.registry.tenant_limits(tenant_id)
        return router.TenantLimits(
            requests_per_minute=stored.requests_per_minute,
            tokens_per_minute=stored.tokens_per_minute,
            max_concurrent=stored.max_concurrent,
            max_total_tokens=stored.max_total_tokens,
        )


def _in_thread(load: Callable[[K], T]) -> Callable[[K], Awaitable[T]]:
    """A blocking loader as a coroutine function that runs it in a worker thread."""

    async def run(key: K) -> T:
        return await asyncio.to_thread(load, key)

    return run


UsageKey = tuple[int, str, int]
"""(tenant id, adapter name, version number) of a usage counter."""


@dataclass(slots=True)
class _Counts:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    latency_seconds: float = 0.0
    latency_count: int = 0
    latency_buckets: list[int] | None = None

    def merge(self, other: _Counts) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.errors += other.errors
        self.latency_seconds += other.latency_seconds
        self.latency_count += other.latency_count
        if other.latency_buckets is not None:
            self.latency_buckets = latency.added([self.latency_buckets, other.latency_buckets])


class UsageBook:
    """Per (tenant, adapter, version): requests, tokens, errors and latency, flushed to the
    registry once a second.

    Every admitted request is added once, when it ends, whether or not it has usage; the
    hot path only adds to counters in memory.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._pending: defaultdict[UsageKey, _Counts] = defaultdict(_Counts)

    def add(
        self,
        tenant_id: int,
        adapter: str,
        version: int,
        prompt: int,
        completion: int,
        *,
        error: bool = False,
        seconds: float | None = None,
    ) -> None:
        """One request: its tokens, whether it failed, and (a success) its latency."""
        counts = self._pending[(tenant_id, adapter, version)]
        counts.requests += 1
        counts.prompt_tokens += prompt
        counts.completion_tokens += completion
        if error:
            counts.errors += 1
        if seconds is not None:
            counts.latency_seconds += seconds
            counts.latency_count += 1
            if counts.latency_buckets is None:
                counts.latency_buckets = [0] * latency.SIZE
            counts.latency_buckets[latency.bucket(seconds)] += 1

    async def flush(self) -> None:
        """Write the pending counts; whatever fails to write is kept for the next flush."""
        pending, self._pending = self._pending, defaultdict(_Counts)
        if pending:
            # One worker-thread hop per flush, not one per key: each hop contends with
            # the event loop for the GIL.
            failed = await asyncio.to_thread(self._write, pending)
            for key, counts in failed.items():
                self._pending[key].merge(counts)

    def _write(self, pending: dict[UsageKey, _Counts]) -> dict[UsageKey, _Counts]:
        failed = {}
        for key, counts in pending.items():
            tenant_id, adapter, version = key
            try:
                self.registry.record_usage(
                    tenant_id,
                    adapter,
                    version,
                    requests=counts.requests,
                    prompt_tokens=counts.prompt_tokens,
                    completion_tokens=counts.completion_tokens,
                    errors=counts.errors,
                    latency_seconds=counts.latency_seconds,
                    latency_count=counts.latency_count,
                    latency_buckets=counts.latency_buckets,
                )
            except Exception:
                # Keep the counts for the next flush rather than lose billable usage.
                log.exception("could not record usage; will retry")
                failed[key] = counts
        return failed

    async def run(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.flush()
