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
from typing import TYPE_CHECKING

import aiohttp
import anyio.from_thread

from registry import RegistryError
from server.engine import Engine

if TYPE_CHECKING:
    from server.app import Gateway

log = logging.getLogger("loraplex.warmup")


async def prewarm(
    client: aiohttp.ClientSession, engines: list[Engine], engine_name: str, engine_key: str
) -> list[str]:
    """Load ``engine_name`` on every given healthy engine; the engines where it failed."""
    targets = [e for e in engines if e.healthy]
    results = await asyncio.gather(*(_warm(client, e, engine_name, engine_key) for e in targets))
    return [e.url for e, ok in zip(targets, results, strict=True) if not ok]


async def _warm(client: aiohttp.ClientSession, engine: Engine, engine_name: str, key: str) -> bool:
    try:
        async with client.post(
            f"{engine.url}/v1/completions",
            json={"model": engine_name, "prompt": " ", "max_tokens": 1},
            headers={"authorization": f"Bearer {key}"},
            timeout=aiohttp.ClientTimeout(total=120),
        ) as response:
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("pre-warm of %s on %s failed: %s", engine_name, engine.url, exc)
        return False
    if status != 200:
        log.warning("pre-warm of %s on %s answered %d", engine_name, engine.url, status)
        return False
    engine.served(engine_name)
    return True


async def unload(
    client: aiohttp.ClientSession, engines: list[Engine], engine_name: str, engine_key: str
) -> None:
    """Drop ``engine_name`` from every engine that may hold it (best effort)."""

    async def one(engine: Engine) -> None:
        try:
            async with client.post(
                f"{engine.url}/v1/unload_lora_adapter",
                json={"lora_name": engine_name},
                headers={"authorization": f"Bearer {engine_key}"},
                timeout=aiohttp.ClientTimeout(total=30),
            ):
                pass
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("unload of %s on %s failed: %s", engine_name, engine.url, exc)
        engine.resident.pop(engine_name, None)

    await asyncio.gather(*(one(e) for e in engines if e.healthy))


class GatewayHooks:
    """The registry API's lifecycle hooks, run from its worker threads against the gateway loop."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def before_traffic(self, tenant_id: int, adapter: str, number: int) -> None:
        registry = self.gateway.registry
        try:
            version = registry.get_version(tenant_id, adapter, number)
        except RegistryError:
            return  # the lifecycle call itself reports it
        bases = {b.id: b.fingerprint for b in registry.list_bases()}
        engines = [
            e for e in self.gateway.engines if e.base_fingerprint == bases.get(version.base_id)
        ]
        client = self.gateway.client
        if client is None or not engines:
            return
        failed = anyio.from_thread.run(
            prewarm, client, engines, version.engine_name, self.gateway.settings.ensure_engine_key()
        )
        if failed:
            log.warning(
                "%s@%d not pre-warmed on %s; it loads on first use", adapter, number, failed
            )

    def after_retire(self, engine_name: str) -> None:
        client = self.gateway.client
        if client is not None:
            anyio.from_thread.run(
                unload,
                client,
                self.gateway.engines,
                engine_name,
                self.gateway.settings.ensure_engine_key(),
            )
