"""Tenant limits every gateway shares, counted in Redis.

Counted in each gateway's memory, N gateways give a tenant N times its quota.
Here every update is one call of one Lua script, atomic on the Redis server and
timed by its clock (``TIME``), so the gateways' clocks do not matter:

- requests/minute and tokens/minute are ``router.limits``' token buckets (one
  minute's allowance, continuous refill; tokens charged up front with prompt +
  max completion, settled with the engine's count), a hash per bucket that
  expires once the bucket would be full again, so idle tenants cost nothing;
- concurrency is a sorted set of leases (member: lease id, score: expiry). Each
  gateway renews its live leases every third of their TTL; a gateway that dies
  stops renewing, and its tenants' slots free within the TTL.

Keys are ``loraplex:limits:{TENANT}:rpm|tpm|leases``: the braces are a Redis
Cluster hash tag, keeping a tenant's three keys in one slot for the script.

What needs no shared count is answered by this gateway's ``router.Limiter``:
tenants without rate or concurrency limits, and requests too long to ever pass.
When Redis is down or slower than the timeout, the request falls back to that
limiter or is refused with a retryable 503 (``limits_on_redis_failure``); Redis
is then left alone for a second, and asked again by the next request after it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio
from prometheus_client import Counter
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

import router
from router.limits import at_concurrency_cap, over_rate, permanent_denial
from server.config import Settings

log = logging.getLogger("loraplex.limits")

KEY_PREFIX = "loraplex:limits"
LEASE_TTL = 30.0
"""Seconds a concurrency lease lives unless its gateway renews it (every third of that)."""
PAUSE_AFTER_FAILURE = 1.0
"""Seconds requests skip Redis after it failed, so an outage costs them no timeout each."""

LUA = """
-- KEYS: the tenant's requests bucket, tokens bucket, leases (lease id -> expiry)
-- ARGV[1] 'admit': rpm, tpm, max_concurrent (0: unlimited), tokens asked, lease, ttl
--          -> {0} admitted, {1, in_flight} at the cap, {2, reason, wait} short of a bucket
-- ARGV[1] 'settle': tpm, tokens charged, tokens used, lease ('' for none) -> {0}
-- ARGV[1] 'renew': ttl, lease... -> {0}
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

-- A bucket is a hash {level, at, per_minute}; a missing one is full.
local function load(key, per_minute)
  local h = redis.call('HMGET', key, 'level', 'at', 'per_minute')
  local level, at, old = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
  if level == nil then return per_minute, now end
  -- Refilled at the rate it had, then cut to today's capacity; a clock stepping
  -- back mints nothing (router.limits.TokenBucket).
  level = math.min(old, level + math.max(0, now - at) * old / 60)
  return math.min(per_minute, level), math.max(at, now)
end

local function save(key, per_minute, level, at)
  redis.call('HSET', key, 'level', level, 'at', at, 'per_minute', per_minute)
  local full_in = (per_minute - level) * 60 / per_minute
  redis.call('PEXPIRE', key, math.ceil(full_in * 1000) + 1000)
end

local op = ARGV[1]
if op == 'admit' then
  local rpm, tpm, cap = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local asked, ttl = tonumber(ARGV[5]), tonumber(ARGV[7])
  if cap > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
    local in_flight = redis.call('ZCARD', KEYS[3])
    if in_flight >= cap then return {1, in_flight} end
  end
  local wait, reason = 0, ''
  local r_level, r_at, t_level, t_at
  if rpm > 0 then
    r_level, r_at = load(KEYS[1], rpm)
    wait, reason = math.max(0, (1 - r_level) * 60 / rpm), 'requests_per_minute'
  end
  if tpm > 0 then
    t_level, t_at = load(KEYS[2], tpm)
    local w = math.max(0, (asked - t_level) * 60 / tpm)
    if w >= wait then wait, reason = w, 'tokens_per_minute' end
  end
  if wait > 0 then return {2, reason, tostring(wait)} end
  if rpm > 0 then save(KEYS[1], rpm, r_level - 1, r_at) end
  if tpm > 0 then save(KEYS[2], tpm, t_level - asked, t_at) end
  if cap > 0 then
    redis.call('ZADD', KEYS[3], now + ttl, ARGV[6])
    redis.call('PEXPIRE', KEYS[3], math.ceil(ttl * 1000))
  end
elseif op == 'settle' then
  local tpm, surplus = tonumber(ARGV[2]), tonumber(ARGV[3]) - tonumber(ARGV[4])
  if ARGV[5] ~= '' then redis.call('ZREM', KEYS[3], ARGV[5]) end
  if tpm > 0 then
    local level, at = load(KEYS[2], tpm)
    level = level + surplus
    -- A refund fills at most to capacity; tokens the engine counted beyond the ask are owed.
    if surplus >= 0 then level = math.min(tpm, level) end
    save(KEYS[2], tpm, level, at)
  end
elseif op == 'renew' then
  local expiry = now + tonumber(ARGV[2])
  for i = 3, #ARGV do redis.call('ZADD', KEYS[3], 'XX', expiry, ARGV[i]) end
  redis.call('PEXPIRE', KEYS[3], math.ceil(tonumber(ARGV[2]) * 1000))
end
return {0}
"""


class LimitsUnavailable(Exception):
    """Redis could not be asked, and the gateway is set to refuse rather than count locally."""

    retry_after = math.ceil(PAUSE_AFTER_FAILURE)


@dataclass(eq=False, slots=True)
class SharedAdmission:
    """A request admitted against the shared counts; settle it exactly once."""

    tenant: str
    tokens_charged: int
    tokens_per_minute: int
    """The tenant's tokens/minute at admission (0: unlimited), the bucket to settle."""
    lease: str
    """Its concurrency lease ('' when the tenant has no concurrency limit)."""
    settled: bool = False


Decision = router.Admission | SharedAdmission | router.Denied


class Outage:
    """Redis failures: counted, one log line per outage, and a pause before asking again."""

    def __init__(self, errors: Counter, fallback: str) -> None:
        self.errors = errors
        self.fallback = fallback
        self.down_since: float | None = None
        self.retry_at = 0.0

    def paused(self, now: float) -> bool:
        return now < self.retry_at

    def failed(self, operation: str, exc: BaseException, now: float) -> None:
        self.errors.labels(operation).inc()
        self.retry_at = now + PAUSE_AFTER_FAILURE
        if self.down_since is None:
            self.down_since = now
            log.warning(
                "shared tenant limits: Redis failed (%s: %s); %s until it answers again",
                operation,
                repr(exc) if isinstance(exc, TimeoutError) else exc,
                self.fallback,
            )

    def answered(self, now: float) -> None:
        if self.down_since is not None:
            log.info(
                "shared tenant limits: Redis answers again after %.1f s", now - self.down_since
            )
            self.down_since = None


class SharedLimiter:
    """Tenant limits counted in Redis, with ``local`` for what needs no shared count."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        local: router.Limiter,
        errors: Counter,
        *,
        timeout: float,
        refuse_on_failure: bool = False,
        lease_ttl: float = LEASE_TTL,
        prefix: str = KEY_PREFIX,
    ) -> None:
        self.client = client
        self.local = local
        self.timeout = timeout
        self.refuse_on_failure = refuse_on_failure
        self.lease_ttl = lease_ttl
        self.prefix = prefix
        fallback = "refusing requests (503)" if refuse_on_failure else "counting locally"
        self.outage = Outage(errors, fallback)
        self._script = client.register_script(LUA)
        self._lease_ids = (f"{secrets.token_hex(4)}:{n}" for n in itertools.count())
        # This gateway's live leases, by tenant: what the renewal loop keeps alive.
        self._leases: dict[str, set[str]] = {}
        self._settling: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(
        cls, settings: Settings, local: router.Limiter, errors: Counter
    ) -> SharedLimiter | None:
        """The shared limiter ``settings`` ask for; None without a Redis URL (count locally)."""
        if not settings.redis_url:
            return None
        # No retries: a request waits one timeout at most, never a retry's backoff on top.
        client = redis.asyncio.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        refuse = settings.limits_on_redis_failure == "refuse"
        return cls(client, local, errors, timeout=settings.redis_timeout, refuse_on_failure=refuse)

    async def check(self, tenant: str, limits: router.TenantLimits, total_tokens: int) -> Decision:
        """Admit a request asking for up to ``total_tokens``, or deny it (``router.Limiter``'s
        answers); raises ``LimitsUnavailable`` if Redis fails and the gateway refuses then."""
        now = time.monotonic()
        if not _counted_together(limits) or permanent_denial(limits, total_tokens) is not None:
            return self.local.check(tenant, limits, total_tokens, now)
        if self.outage.paused(now):
            return self._without_redis(tenant, limits, total_tokens, now)
        lease = next(self._lease_ids) if limits.max_concurrent else ""
        args = (
            "admit",
            limits.requests_per_minute or 0,
            limits.tokens_per_minute or 0,
            limits.max_concurrent or 0,
            total_tokens,
            lease,
            self.lease_ttl,
        )
        try:
            reply = await self._call(tenant, args)
        except (RedisError, OSError, TimeoutError) as exc:
            self.outage.failed("admit", exc, now)
            return self._without_redis(tenant, limits, total_tokens, now)
        self.outage.answered(now)
        return self._decision(reply, tenant, limits, total_tokens, lease)

    def settle(self, admission: SharedAdmission, actual_tokens: int) -> None:
        """End an admitted request that used ``actual_tokens``: its lease returned, its token
        charge corrected, in the background (callers are sync and must not wait)."""
        if admission.settled:
            raise router.AlreadySettled(
                f"admission for tenant {admission.tenant!r} was already settled; "
                "settle once, in a finally block"
            )
        admission.settled = True
        if admission.lease:
            leases = self._leases.get(admission.tenant, set())
            leases.discard(admission.lease)
            if not leases:
                self._leases.pop(admission.tenant, None)
        corrected = admission.tokens_per_minute and admission.tokens_charged != actual_tokens
        if not (admission.lease or corrected):
            return
        task = asyncio.get_running_loop().create_task(self._settle(admission, actual_tokens))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def renew_leases(self) -> None:
        """Keep this gateway's live leases alive, for its lifetime."""
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            await self.renew()

    async def renew(self) -> None:
        """One renewal of every live lease, in one pipeline."""
        if not self._leases:
            return
        pipe = self.client.pipeline(transaction=False)
        for tenant, leases in self._leases.items():
            args: tuple[str | float, ...] = ("renew", self.lease_ttl, *leases)
            await self._script(keys=self._keys(tenant), args=args, client=pipe)
        now = time.monotonic()
        try:
            async with asyncio.timeout(max(self.timeout, 1.0)):
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self.outage.failed("renew", exc, now)

    async def drain(self) -> None:
        """Wait for the settlements under way (each bounded by the timeout)."""
        await asyncio.gather(*self._settling, return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        await self.client.aclose()

    async def _call(self, tenant: str, args: tuple[str | int | float, ...]) -> Any:
        async with asyncio.timeout(self.timeout):
            return await self._script(keys=self._keys(tenant), args=args)

    async def _settle(self, admission: SharedAdmission, actual_tokens: int) -> None:
        now = time.monotonic()
        if self.outage.paused(now):
            return  # its lease lapses by itself; the token correction is lost
        args = (
            "settle",
            admission.tokens_per_minute,
            admission.tokens_charged,
            actual_tokens,
            admission.lease,
        )
        try:
            await self._call(admission.tenant, args)
        except (RedisError, OSError, TimeoutError) as exc:
            self.outage.failed("settle", exc, now)

    def _keys(self, tenant: str) -> tuple[str, str, str]:
        stem = f"{self.prefix}:{{{tenant}}}"
        return f"{stem}:rpm", f"{stem}:tpm", f"{stem}:leases"

    def _without_redis(
        self, tenant: str, limits: router.TenantLimits, total_tokens: int, now: float
    ) -> Decision:
        if self.refuse_on_failure:
            raise LimitsUnavailable(
                "Tenant limits cannot be checked right now (their store is unavailable); "
                f"retry in {LimitsUnavailable.retry_after} s."
            )
        return self.local.check(tenant, limits, total_tokens, now)

    def _decision(
        self, reply: list[Any], tenant: str, limits: router.TenantLimits, asked: int, lease: str
    ) -> Decision:
        status = int(reply[0])
        if status == 0:
            if lease:
                self._leases.setdefault(tenant, set()).add(lease)
            return SharedAdmission(tenant, asked, limits.tokens_per_minute or 0, lease)
        if status == 1:
            return at_concurrency_cap(int(reply[1]), limits.max_concurrent or 0)
        return over_rate(router.DenyReason(reply[1].decode()), float(reply[2]))


def _counted_together(limits: router.TenantLimits) -> bool:
    """Whether the tenant has a limit whose count all gateways share."""
    return bool(limits.requests_per_minute or limits.tokens_per_minute or limits.max_concurrent)
