"""The gateway's ASGI app: its parts wired together, its routes, and its lifespan.

``create_gateway`` builds each part once and hands each consumer only what it
uses. The OpenAI routes read raw JSON (no pydantic models on the hot path):
the engines validate requests in full, the gateway only checks what it must
own (size, model name, token bounds) and answers everything else the engine says.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator, Coroutine
from functools import partial
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

import router
from registry import Registry
from registry.captures import CaptureStore
from registry.drift import DriftStore
from registry.routed_models import RoutedModelStore
from registry.shadow import ShadowStore
from server import console
from server.config import Settings
from server.errors import APIError, install_api_error_handler, unhandled_response
from server.gateway import loops, openai_routes, ops_routes
from server.gateway.accounting import Accounting
from server.gateway.bases import Identifier
from server.gateway.capture import Capture
from server.gateway.content_routing import ContentRouter
from server.gateway.discovery import Discovery
from server.gateway.drift import DriftBook
from server.gateway.engines import EngineSupervisor
from server.gateway.forwarding import Forwarder
from server.gateway.inference import Inference
from server.gateway.metrics import Metrics
from server.gateway.replicas import Engine, Replicas
from server.gateway.resolution import Resolver
from server.gateway.shadow import Shadow
from server.gateway.shared_limits import SharedLimiter
from server.gateway.tenancy import Tenancy, UsageBook
from server.gateway.warmup import WarmupHooks


class GatewayApp(FastAPI):
    """The FastAPI app, with the inference routes answered ahead of its routing and middleware.

    Framework routing, middleware and request objects cost more CPU than the
    rest of a proxied request, so POSTs to the two OpenAI inference paths go
    straight to ``Inference.serve`` with the raw ASGI scope. Everything else
    (registry and jobs APIs, docs, ops routes, lifespan) is plain FastAPI.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hot_routes: dict[str, ASGIApp] = {}
        self._framework: ASGIApp = partial(FastAPI.__call__, self)

    def trust_forwarded_headers(self, trusted_hosts: list[str] | str) -> None:
        """Take the client address from ``X-Forwarded-For`` sent by ``trusted_hosts``.

        uvicorn does this for the whole app; here only the framework routes get
        it (``/metrics`` decides by client address), so inference requests do
        not pay for a header scan they never use.
        """
        # uvicorn types the scope more narrowly than Starlette; the two are the same protocol.
        middleware = ProxyHeadersMiddleware(partial(FastAPI.__call__, self), trusted_hosts)
        self._framework = cast(ASGIApp, middleware)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            hot = self.hot_routes.get(scope["path"])
            if hot is not None:
                await hot(scope, receive, send)
                return
        await self._framework(scope, receive, send)


def create_gateway(
    settings: Settings,
    registry: Registry,
    engines: list[Engine] | None = None,
    supervisors: list[EngineSupervisor] | None = None,
) -> GatewayApp:
    """The gateway. Pass ``supervisors`` to run engines, or ``engines`` to use running ones
    (each asked which base it serves, unless it says already)."""
    supervisors = supervisors or []
    metrics = Metrics()
    tenancy = Tenancy(registry)
    usage = UsageBook(registry)
    replicas = _replicas(settings, [s.engine for s in supervisors] if engines is None else engines)
    forwarder = Forwarder(settings, metrics)
    inference = _inference(settings, registry, tenancy, usage, replicas, forwarder)
    capture, drift, shadow = inference.capture, inference.drift, inference.shadow
    shared = inference.accounting.shared

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with forwarder.connected():
            jobs = _background_jobs(settings, registry, supervisors, replicas, forwarder)
            if shared is not None:
                jobs.append(shared.renew_leases())
            jobs += [usage.run(), capture.run(), capture.purge_expired()]
            jobs += [drift.run(settings.drift_interval), shadow.run()]
            tasks = [asyncio.create_task(job) for job in jobs]
            _freeze_startup_heap()
            try:
                yield
            finally:
                shadow.cancel()
                for book in (usage, capture, drift, shadow):  # what it holds unwritten
                    await book.flush()
                await asyncio.gather(*(s.stop() for s in supervisors))
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if shared is not None:
                    await shared.close()

    app = GatewayApp(title="loraplex", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.hot_routes.update(openai_routes.add(app, inference, tenancy, replicas.bases, settings))
    ops_routes.add(app, replicas, metrics, settings.metrics_token)
    console.add(app)  # the lifecycle console's static pages at /console/
    app.state.registry = registry
    app.state.capture_store = capture.store
    app.state.drift_threshold = settings.drift_threshold
    app.state.lifecycle_hooks = WarmupHooks(registry, replicas, forwarder)
    app.state.content_router = inference.resolver.content
    return app


def _inference(
    settings: Settings,
    registry: Registry,
    tenancy: Tenancy,
    usage: UsageBook,
    replicas: Replicas,
    forwarder: Forwarder,
) -> Inference:
    """The inference routes, with the books they fill (capture, drift, shadow)."""
    metrics = forwarder.metrics
    limiter = router.Limiter()
    shared = SharedLimiter.from_settings(settings, limiter, metrics.limit_store_errors)
    content = ContentRouter(RoutedModelStore(registry), tenancy, replicas, forwarder, usage)
    return Inference(
        tenancy,
        Resolver(tenancy, replicas.bases, replicas.unidentified, content),
        Accounting(limiter, usage, metrics, settings.max_tokens_limit, shared),
        replicas,
        forwarder,
        settings.max_request_bytes,
        settings.max_tokens_limit,
        Capture(CaptureStore(registry), metrics),
        DriftBook(DriftStore(registry), metrics, settings.drift_threshold),
        Shadow(ShadowStore(registry), replicas, forwarder, metrics, settings.shadow_max_in_flight),
    )


def _replicas(settings: Settings, engines: list[Engine]) -> Replicas:
    replicas = Replicas(router.Placer(), settings.max_cpu_loras)
    for engine in engines:
        replicas.add(engine)
    return replicas


def _background_jobs(
    settings: Settings,
    registry: Registry,
    supervisors: list[EngineSupervisor],
    replicas: Replicas,
    forwarder: Forwarder,
) -> list[Coroutine[Any, Any, None]]:
    """The loops that run for the gateway's lifetime (the usage flush aside)."""
    client, metrics = forwarder.client, forwarder.metrics
    jobs: list[Coroutine[Any, Any, None]] = [s.run(client) for s in supervisors]
    if not supervisors:
        identifier = Identifier(registry, replicas, forwarder.engine_key())
        jobs.append(loops.watch_engines(replicas, client, identifier))
    if settings.engine_discovery:
        discovery = Discovery.parse(settings.engine_discovery)

        def removed(engine: Engine) -> None:
            metrics.forget_engine(engine.name)
            forwarder.forget(engine)

        jobs.append(loops.discover_engines(replicas, discovery, removed))
    jobs.append(loops.export_engine_state(replicas, supervisors, metrics))
    jobs.append(loops.watch_loop_lag(metrics))
    return jobs


def _freeze_startup_heap() -> None:
    """Keep the objects of start-up (modules, FastAPI, SQLAlchemy, pydantic: ~150k) out of
    every later garbage collection: a full collection over them took 70-90 ms on these
    machines, a pause every request in flight would wait out; frozen, it takes microseconds."""
    gc.collect()
    gc.freeze()


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI's error shape for every error: HTTP errors, invalid bodies (400, the field
    named), anything unhandled (500)."""
    install_api_error_handler(app)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return APIError(exc.status_code, detail).response()

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        problem = first.get("msg", "invalid value")
        message = f"{where}: {problem}" if where else f"request body: {problem}"
        return APIError(400, message, param=where or None).response()

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unhandled_response)
