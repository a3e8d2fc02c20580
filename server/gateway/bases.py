"""Which base each engine serves, asked of the engine itself: declared once, never configured twice.

An engine declares its base by the name it serves it under (vLLM's
``--served-model-name``, listed by the engine's own ``/v1/models`` behind the
internal key); the registry maps that name to the base's fingerprint. Engines
``serve`` started need no asking: their supervisor knows the base it gave them.

An engine whose name is no registered base, or is several (two revisions
registered under one name), gets no traffic; the log says what to change, and
the next good probe asks again, so registering the base later is enough.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from registry import Registry
from server.errors import REGISTRY_DOWN
from server.gateway.replicas import Engine, Replicas

log = logging.getLogger("loraplex.bases")


class BaseUnknown(Exception):
    """An engine serves a name the registry cannot map to exactly one base."""


async def served_name(client: aiohttp.ClientSession, engine: Engine, engine_key: str) -> str:
    """The model name ``engine`` serves (the first of its ``/v1/models``); raises on failure."""
    async with client.get(
        f"{engine.url}/v1/models",
        headers={"authorization": f"Bearer {engine_key}"},
        timeout=aiohttp.ClientTimeout(total=5),
    ) as response:
        response.raise_for_status()
        listed = await response.json()
    models = [m for m in listed.get("data", []) if not m.get("parent")]  # LoRAs have a parent
    if not models:
        raise BaseUnknown(f"engine {engine.url} lists no base model in /v1/models")
    return str(models[0]["id"])


def fingerprint_of(registry: Registry, name: str) -> str:
    """The fingerprint of the one registered base called ``name``."""
    matches = [b for b in registry.list_bases() if b.name == name]
    if not matches:
        raise BaseUnknown(
            f"it serves {name!r}, which is no registered base; register it with "
            f"`loraplex bases register MODEL_DIR --name {name}`"
        )
    if len(matches) > 1:
        revisions = ", ".join(b.revision for b in matches)
        raise BaseUnknown(
            f"it serves {name!r}, registered as several revisions ({revisions}); serve "
            "each revision under a name of its own (--served-model-name)"
        )
    return matches[0].fingerprint


class Identifier:
    """Asks engines which base they serve, for the health watcher (``loops.watch_engines``)."""

    def __init__(self, registry: Registry, replicas: Replicas, engine_key: str) -> None:
        self.registry = registry
        self.replicas = replicas
        self.engine_key = engine_key
        self._warned: dict[str, str] = {}  # url -> last warning: each said once, not per probe

    def due(self, engine: Engine) -> bool:
        """Whether to ask before taking a good probe: base unknown, or engine coming back
        (a replaced engine at the same address may serve another base)."""
        return not engine.base_fingerprint or not engine.healthy

    async def identify(self, engine: Engine, client: aiohttp.ClientSession) -> None:
        """Ask ``engine`` which base it serves and record it; warns if that is no one base."""
        try:
            name = await served_name(client, engine, self.engine_key)
            fingerprint = await asyncio.to_thread(fingerprint_of, self.registry, name)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            self._warn(engine, f"could not read its base from /v1/models: {exc!r}")
            return
        except REGISTRY_DOWN as exc:  # asked again at the next good probe
            self._warn(engine, f"base not looked up, the registry is unavailable: {exc!r}")
            return
        except BaseUnknown as exc:
            self._warn(engine, f"gets no traffic: {exc}")
            self._record(engine, "", "")
            return
        self._warned.pop(engine.url, None)
        if self._record(engine, name, fingerprint):
            log.info("engine %s serves base %s (%s)", engine.url, name, fingerprint[:12])

    def _record(self, engine: Engine, name: str, fingerprint: str) -> bool:
        """Whether this changed what ``engine`` is known to serve."""
        if (name, fingerprint) == (engine.base_name, engine.base_fingerprint):
            return False
        engine.serves(name, fingerprint)
        self.replicas.update_bases()
        return True

    def _warn(self, engine: Engine, problem: str) -> None:
        if self._warned.get(engine.url) != problem:
            self._warned[engine.url] = problem
            log.warning("engine %s %s", engine.url, problem)
