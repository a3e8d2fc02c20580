"""The gateway's connections to its engines, and sending a request to the first that takes it.

Plain-http engines are reached through the hot path's own pool
(``engine_client.EnginePool``); https engines and health probes use aiohttp.
A request that could not reach an engine goes to the next candidate (no answer
has started, and an inference request has no side effects), and the engine is
reported unreachable, which ejects it until probes readmit it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from server.config import Settings
from server.gateway import proxy
from server.gateway.engine_client import EnginePool
from server.gateway.fair_queue import FairGate
from server.gateway.metrics import Metrics
from server.gateway.replicas import Engine


class NotConnected(RuntimeError):
    """The forwarder was used outside ``connected()`` (before start-up or after shutdown)."""


class Forwarder:
    """Sends requests to engines; its connections live inside ``connected()``."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._client: aiohttp.ClientSession | None = None
        self._pool: EnginePool | None = None
        self.fair_queue = FairGate(settings, metrics)
        """Where requests wait for their turn at the engines (``fair_queue``)."""

    @property
    def client(self) -> aiohttp.ClientSession:
        """aiohttp, for health probes, pre-warming and https engines."""
        if self._client is None:
            raise NotConnected("the gateway's engine connections are not open")
        return self._client

    @property
    def connected_now(self) -> bool:
        return self._client is not None

    def engine_key(self) -> str:
        return self.settings.ensure_engine_key()

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        """Open the connections for the gateway's lifetime; close them after."""
        s = self.settings
        async with _client(s) as client:
            self._client = client
            self._pool = EnginePool(s.upstream_connect_timeout, s.upstream_timeout)
            try:
                yield
            finally:
                self._pool.close()
                self._client = self._pool = None

    def forget(self, engine: Engine) -> None:
        """Close the idle connections to an engine that left."""
        if self._pool is not None:
            self._pool.drop(engine.url)

    async def open(
        self, candidates: list[Engine], path: str, body: dict[str, Any]
    ) -> tuple[proxy.Upstream, Engine]:
        """Send to the first engine that answers; fail over while no response has started."""
        client, key = self.client, self.engine_key()
        last: proxy.UpstreamFailure | None = None
        for engine in candidates:
            try:
                upstream = await proxy.send(client, self._pool, engine, path, body, key)
                self.metrics.engine_requests_of(engine.name).inc()
                return upstream, engine
            except proxy.UpstreamFailure as failure:
                self.metrics.upstream_errors_of(engine.name, failure.reason).inc()
                last = failure
                if failure.status == 504:
                    break  # a timed-out generation is not repeated elsewhere: double the wait
                engine.report_unreachable()
        assert last is not None
        raise last

    async def ask(
        self, candidates: list[Engine], path: str, body: dict[str, Any]
    ) -> tuple[int, bytes, Engine]:
        """A whole answer the gateway reads itself (a shadow copy, a classifier's label): its
        status and body, from the first engine that takes it, counted in flight meanwhile."""
        upstream, engine = await self.open(candidates, path, body)
        engine.in_flight += 1
        try:
            content = await upstream.read()
        finally:
            upstream.release()
            engine.in_flight -= 1
        return upstream.status, content, engine


def _client(settings: Settings) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=settings.upstream_connect_timeout,
        sock_read=settings.upstream_timeout,
    )
    connector = aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=30)
    # auto_decompress off: bodies are relayed as the engine sent them.
    return aiohttp.ClientSession(
        timeout=timeout,
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=["User-Agent"],
    )
