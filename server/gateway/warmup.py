"""Pre-warming adapters on engines before traffic moves to them, and unloading retired ones.

Pre-warm sends each healthy replica of the version's base a one-token request
for the engine-side name: the engine's resolver plugin fetches, verifies and
loads the adapter exactly as it would for live traffic, so the first real
request after a promote pays no cold start. Unloading uses the engine's
internal ``/v1/unload_lora_adapter`` endpoint (reachable only by the gateway).
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import anyio.from_thread

from registry import Registry, RegistryError
from server.gateway.forwarding import Forwarder
from server.gateway.replicas import Engine, Replicas

log = logging.getLogger("loraplex.warmup")


async def prewarm(
    client: aiohttp.ClientSession, engines: list[Engine], lora_name: str, engine_key: str
) -> list[str]:
    """Load ``lora_name`` on every given healthy engine; the engines where it failed."""
    targets = [e for e in engines if e.healthy]
    results = await asyncio.gather(*(_warm(client, e, lora_name, engine_key) for e in targets))
    return [e.url for e, ok in zip(targets, results, strict=True) if not ok]


async def _warm(client: aiohttp.ClientSession, engine: Engine, lora_name: str, key: str) -> bool:
    try:
        async with client.post(
            f"{engine.url}/v1/completions",
            json={"model": lora_name, "prompt": " ", "max_tokens": 1},
            headers={"authorization": f"Bearer {key}"},
            timeout=aiohttp.ClientTimeout(total=120),
        ) as response:
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("pre-warm of %s on %s failed: %s", lora_name, engine.url, exc)
        return False
    if status != 200:
        log.warning("pre-warm of %s on %s answered %d", lora_name, engine.url, status)
        return False
    engine.served(lora_name)
    return True


async def unload(
    client: aiohttp.ClientSession, engines: list[Engine], lora_name: str, engine_key: str
) -> None:
    """Drop ``lora_name`` from every engine that may hold it (best effort)."""

    async def one(engine: Engine) -> None:
        try:
            async with client.post(
                f"{engine.url}/v1/unload_lora_adapter",
                json={"lora_name": lora_name},
                headers={"authorization": f"Bearer {engine_key}"},
                timeout=aiohttp.ClientTimeout(total=30),
            ):
                pass
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("unload of %s on %s failed: %s", lora_name, engine.url, exc)
        engine.resident.pop(lora_name, None)

    await asyncio.gather(*(one(e) for e in engines if e.healthy))


class WarmupHooks:
    """The registry API's lifecycle hooks: pre-warm before traffic moves, unload after retire.

    Called from the registry API's worker threads; each runs its work on the gateway's loop.
    """

    def __init__(self, registry: Registry, replicas: Replicas, forwarder: Forwarder) -> None:
        self.registry = registry
        self.replicas = replicas
        self.forwarder = forwarder

    def before_traffic(self, tenant_id: int, adapter: str, number: int) -> None:
        try:
            version = self.registry.get_version(tenant_id, adapter, number)
        except RegistryError:
            return  # the lifecycle call itself reports it
        bases = {b.id: b.fingerprint for b in self.registry.list_bases()}
        base = bases.get(version.base_id)
        engines = self.replicas.of_base(base) if base else []
        if not self.forwarder.connected_now or not engines:
            return
        failed = anyio.from_thread.run(
            prewarm, self.forwarder.client, engines, version.lora_name, self.forwarder.engine_key()
        )
        if failed:
            log.warning(
                "%s@%d not pre-warmed on %s; it loads on first use", adapter, number, failed
            )

    def after_retire(self, lora_name: str) -> None:
        if self.forwarder.connected_now:
            anyio.from_thread.run(
                unload,
                self.forwarder.client,
                self.replicas.engines,
                lora_name,
                self.forwarder.engine_key(),
            )
