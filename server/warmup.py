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

import httpx

from server.engine import Engine

log = logging.getLogger("loraplex.warmup")


async def prewarm(
    client: httpx.AsyncClient, engines: list[Engine], engine_name: str, engine_key: str
) -> list[str]:
    """Load ``engine_name`` on every given healthy engine; the engines where it failed."""
    targets = [e for e in engines if e.healthy]
    results = await asyncio.gather(*(_warm(client, e, engine_name, engine_key) for e in targets))
    return [e.url for e, ok in zip(targets, results, strict=True) if not ok]


async def _warm(client: httpx.AsyncClient, engine: Engine, engine_name: str, key: str) -> bool:
    try:
        response = await client.post(
            f"{engine.url}/v1/completions",
            json={"model": engine_name, "prompt": " ", "max_tokens": 1},
            headers={"authorization": f"Bearer {key}"},
            timeout=120,
        )
    except httpx.HTTPError as exc:
        log.warning("pre-warm of %s on %s failed: %s", engine_name, engine.url, exc)
        return False
    if response.status_code != 200:
        log.warning(
            "pre-warm of %s on %s answered %d", engine_name, engine.url, response.status_code
        )
        return False
    engine.served(engine_name)
    return True


async def unload(
    client: httpx.AsyncClient, engines: list[Engine], engine_name: str, engine_key: str
) -> None:
    """Drop ``engine_name`` from every engine that may hold it (best effort)."""

    async def one(engine: Engine) -> None:
        try:
            await client.post(
                f"{engine.url}/v1/unload_lora_adapter",
                json={"lora_name": engine_name},
                headers={"authorization": f"Bearer {engine_key}"},
                timeout=30,
            )
        except httpx.HTTPError as exc:
            log.warning("unload of %s on %s failed: %s", engine_name, engine.url, exc)
        engine.resident.pop(engine_name, None)

    await asyncio.gather(*(one(e) for e in engines if e.healthy))
