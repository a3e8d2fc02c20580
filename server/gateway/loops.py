"""The gateway's background loops, each started by the app's lifespan and cancelled at its end:
health probes of engines it did not start, engine discovery, engine-state metrics and the
event-loop lag monitor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from server.gateway.bases import Identifier
from server.gateway.discovery import DISCOVERY_INTERVAL, Discovery, diff
from server.gateway.engines import EngineSupervisor, probe
from server.gateway.metrics import Metrics
from server.gateway.replicas import EXTERNAL_HEALTH, Engine, Replicas

log = logging.getLogger("loraplex.gateway")

LOOP_LAG_INTERVAL = 0.05
"""Seconds between the event-loop lag checks (20 timers a second: no measurable CPU)."""
LOOP_STALL_WARNING = 0.1
"""A loop late by this many seconds is logged, with where the time went."""


async def watch_engines(
    replicas: Replicas, client: aiohttp.ClientSession, identifier: Identifier
) -> None:
    """Probe engines that ``serve`` did not start (their supervisor probes the others), and
    learn the base of each before it gets traffic."""

    async def check(engine: Engine) -> None:
        ok = await probe(client, engine)
        try:
            if ok and identifier.due(engine):
                await identifier.identify(engine, client)
        except Exception:  # this loop is every external engine's health: it must not end
            log.exception("asking engine %s for its base failed", engine.url)
        engine.report_probe(ok)

    while True:
        # A copy: discovery may change the list while we probe.
        await asyncio.gather(*(check(e) for e in list(replicas.engines)))
        await asyncio.sleep(EXTERNAL_HEALTH.probe_interval)


async def discover_engines(
    replicas: Replicas,
    discovery: Discovery,
    on_removed: Callable[[Engine], None],
) -> None:
    """Follow the discovered engine list; a failed lookup keeps the last good one."""
    while True:
        try:
            found = await discovery.urls()
        except OSError as exc:
            kept = len(replicas.engines)
            log.warning("engine discovery failed (%s); keeping %d engines", exc, kept)
        else:
            change = diff([e.url for e in replicas.engines], found)
            for url in change.added:
                log.info("engine %s discovered", url)
                replicas.add(Engine(url))  # its base: asked once its probes pass
            if change.removed:
                log.info("engines %s left the discovered list", ", ".join(change.removed))
                for engine in replicas.remove(set(change.removed)):
                    on_removed(engine)
        await asyncio.sleep(DISCOVERY_INTERVAL)


async def export_engine_state(
    replicas: Replicas, supervisors: list[EngineSupervisor], metrics: Metrics
) -> None:
    restarts = {s.engine.url: s for s in supervisors}
    while True:
        for engine in replicas.engines:
            metrics.engine_up.labels(engine.name).set(1 if engine.healthy else 0)
            if engine.url in restarts:
                metrics.engine_restarts.labels(engine.name).set(restarts[engine.url].restarts)
        await asyncio.sleep(1.0)


async def watch_loop_lag(metrics: Metrics) -> None:
    """Time how late the event loop runs a timer: every request in flight waited as long.

    The warning tells CPU-bound code on the loop (its thread used the CPU the
    whole time) from a blocking call on the loop, or a wait for a CPU or for the
    GIL held by a worker thread (it used little), which are different fixes.
    """
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + LOOP_LAG_INTERVAL
        cpu_before = time.thread_time()
        await asyncio.sleep(LOOP_LAG_INTERVAL)
        lag = max(0.0, loop.time() - due)
        metrics.loop_lag.observe(lag)
        if lag >= LOOP_STALL_WARNING:
            log.warning(
                "event loop stalled %.0f ms; its thread used %.0f ms of CPU in the %.0f ms "
                "since the last check (all of it: CPU-bound code on the loop; little: a "
                "blocking call on the loop, or a wait for a CPU or for the GIL)",
                lag * 1000,
                (time.thread_time() - cpu_before) * 1000,
                (LOOP_LAG_INTERVAL + lag) * 1000,
            )
