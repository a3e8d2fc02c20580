"""The gateway: a FastAPI app in front of the engine replicas.

``create_app`` wires settings, engines and metrics into routes. The OpenAI
routes read raw JSON (no pydantic models on the hot path): the engines
validate requests in full, the gateway only checks what it must own (size,
model name, token bounds) and answers everything else the engine says.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from server import proxy
from server.config import Settings
from server.engine import Engine, EngineSupervisor, probe
from server.errors import APIError, model_not_found
from server.metrics import Metrics

log = logging.getLogger("loraplex.gateway")


@dataclass
class Gateway:
    """Everything the routes share; stored on ``app.state.gateway``."""

    settings: Settings
    engines: list[Engine]
    supervisors: list[EngineSupervisor] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    client: httpx.AsyncClient | None = None
    started_at: float = field(default_factory=time.time)

    @property
    def base_name(self) -> str:
        return self.settings.resolved_served_model_name

    def ready(self) -> bool:
        return any(engine.healthy for engine in self.engines)

    def candidates(self) -> list[Engine]:
        """Healthy engines, least busy first; the rest are failover order."""
        healthy = [e for e in self.engines if e.healthy]
        return sorted(healthy, key=lambda e: e.in_flight)


def create_app(
    settings: Settings,
    engines: list[Engine] | None = None,
    supervisors: list[EngineSupervisor] | None = None,
) -> FastAPI:
    """The gateway app. Pass ``supervisors`` to run engines, or ``engines`` to use running ones."""
    supervisors = supervisors or []
    if engines is None:
        engines = [s.engine for s in supervisors] or [
            Engine(url.rstrip("/"), settings.resolved_served_model_name)
            for url in settings.engine_urls
        ]
    gateway = Gateway(settings, engines, supervisors)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with _client(settings) as client:
            gateway.client = client
            tasks = [asyncio.create_task(s.run(client)) for s in supervisors]
            if not supervisors:
                tasks.append(asyncio.create_task(_watch_engines(gateway, client)))
            tasks.append(asyncio.create_task(_export_engine_state(gateway)))
            try:
                yield
            finally:
                await asyncio.gather(*(s.stop() for s in supervisors))
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gateway
    _install_error_handlers(app)
    _add_openai_routes(app, gateway)
    _add_ops_routes(app, gateway)
    return app


def _client(settings: Settings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        settings.upstream_timeout, connect=settings.upstream_connect_timeout, pool=5.0
    )
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    return httpx.AsyncClient(timeout=timeout, limits=limits)


async def _watch_engines(gateway: Gateway, client: httpx.AsyncClient) -> None:
    """Health-check engines that ``serve`` did not start (their supervisor checks the others)."""
    while True:
        results = await asyncio.gather(*(probe(client, e) for e in gateway.engines))
        for engine, ok in zip(gateway.engines, results, strict=True):
            if engine.healthy != ok:
                log.warning("engine %s is now %s", engine.url, "up" if ok else "down")
            engine.healthy = ok
        await asyncio.sleep(1.0)


async def _export_engine_state(gateway: Gateway) -> None:
    restarts = {s.engine.url: s for s in gateway.supervisors}
    while True:
        for engine in gateway.engines:
            gateway.metrics.engine_up.labels(engine.name).set(1 if engine.healthy else 0)
            if engine.url in restarts:
                gateway.metrics.engine_restarts.labels(engine.name).set(
                    restarts[engine.url].restarts
                )
        await asyncio.sleep(1.0)


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return exc.response()

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return APIError(exc.status_code, detail).response()

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else "invalid request"
        return APIError(400, message, param=where or None).response()

    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return APIError(500, "Internal error in the gateway; it has been logged.").response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


# -- OpenAI routes ---------------------------------------------------------


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, refusing bodies over ``limit`` bytes (413)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body is {declared} bytes; the limit is {limit}.")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise APIError(400, f"Request body is not valid JSON: {exc}.") from exc
    if not isinstance(body, dict):
        raise APIError(400, "Request body must be a JSON object.")
    return body


def check_bounds(body: dict[str, Any], settings: Settings) -> None:
    """Refuse what the gateway bounds itself: token counts, ``n``, ``stream`` types."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise APIError(400, "`model` is required and must be a non-empty string.", param="model")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise APIError(400, f"`{name}` must be a positive integer.", param=name)
        if value > settings.max_tokens_limit:
            raise APIError(
                400,
                f"`{name}` is {value}; this server allows at most {settings.max_tokens_limit}.",
                param=name,
                code="max_tokens_exceeded",
            )
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 16:
        raise APIError(400, "`n` must be an integer from 1 to 16.", param="n")
    if not isinstance(body.get("stream", False), bool):
        raise APIError(400, "`stream` must be true or false.", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "`stream_options` must be an object.", param="stream_options")


async def resolve_base_only(gateway: Gateway, body: dict[str, Any]) -> proxy.Target:
    """Issue-2 resolution: the only servable model is the base."""
    model = body["model"]
    if model != gateway.base_name:
        raise model_not_found(model)
    return proxy.Target(requested_model=model, engine_model=gateway.base_name)


def _add_openai_routes(app: FastAPI, gateway: Gateway) -> None:
    async def chat_completions(request: Request) -> Response:
        return await _proxy_route(request, gateway, "/v1/chat/completions")

    async def completions(request: Request) -> Response:
        return await _proxy_route(request, gateway, "/v1/completions")

    async def models() -> dict[str, Any]:
        created = int(gateway.started_at)
        return {
            "object": "list",
            "data": [
                {
                    "id": gateway.base_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "loraplex",
                }
            ],
        }

    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])


async def _proxy_route(request: Request, gateway: Gateway, path: str) -> Response:
    settings = gateway.settings
    started = time.perf_counter()
    body = await read_json(request, settings.max_request_bytes)
    check_bounds(body, settings)
    target = await resolve_base_only(gateway, body)
    body["model"] = target.engine_model
    wants_stream = bool(body.get("stream"))
    options = body.get("stream_options") or {}
    keep_usage = bool(options.get("include_usage"))
    if wants_stream:
        body["stream_options"] = {**options, "include_usage": True}

    outcome = proxy.Outcome()
    outcome.on_finish.append(lambda o: _record(gateway, path, target, o, started))
    gateway.metrics.in_flight.inc()
    outcome.on_finish.append(lambda _: gateway.metrics.in_flight.dec())
    try:
        upstream, engine = await _open_upstream(gateway, path, body)
    except APIError as exc:
        outcome.status = exc.status
        outcome.error = getattr(exc, "reason", "") or "rejected"
        outcome.finish()
        raise
    engine.in_flight += 1
    outcome.on_finish.append(lambda _: setattr(engine, "in_flight", engine.in_flight - 1))
    if upstream.status_code != 200:
        outcome.status = upstream.status_code
        outcome.finish()
        return await proxy.error_from_engine(upstream)
    if wants_stream:
        return proxy.stream(upstream, target, outcome, engine, keep_usage)
    try:
        return await proxy.complete(upstream, target, outcome)
    except httpx.HTTPError as exc:
        failure = proxy.classify(exc, engine)
        outcome.status, outcome.error = failure.status, failure.reason
        outcome.finish()
        raise failure from exc


async def _open_upstream(
    gateway: Gateway, path: str, body: dict[str, Any]
) -> tuple[httpx.Response, Engine]:
    """Send to the first engine that accepts the connection; fail over on connect errors."""
    assert gateway.client is not None
    candidates = gateway.candidates()
    if not candidates:
        raise proxy.UpstreamFailure(
            503,
            "No model engine is ready yet; retry in a few seconds.",
            "no_engine",
            retry_after=5,
        )
    last: proxy.UpstreamFailure | None = None
    for engine in candidates:
        try:
            upstream = await proxy.send(
                gateway.client, engine, path, body, gateway.settings.ensure_engine_key()
            )
            return upstream, engine
        except proxy.UpstreamFailure as failure:
            gateway.metrics.upstream_errors.labels(engine.name, failure.reason).inc()
            last = failure
            if failure.status != 503:
                break  # only connection failures are safe to retry elsewhere
            engine.healthy = False
    assert last is not None
    raise last


def _record(
    gateway: Gateway, path: str, target: proxy.Target, outcome: proxy.Outcome, started: float
) -> None:
    m = gateway.metrics
    route = path.removeprefix("/v1/").replace("/", "_")
    status = str(outcome.status or 500) if not outcome.error else outcome.error
    m.requests.labels(route, target.tenant, target.adapter, target.version, status).inc()
    end = outcome.finished_at or time.perf_counter()
    m.latency.labels(route, target.tenant, target.adapter).observe(end - started)
    if outcome.first_byte_at is not None:
        m.ttft.labels(target.tenant, target.adapter).observe(outcome.first_byte_at - started)
    if outcome.usage is not None:
        labels = (target.tenant, target.adapter, target.version)
        m.tokens.labels(*labels, "prompt").inc(outcome.usage.prompt_tokens)
        m.tokens.labels(*labels, "completion").inc(outcome.usage.completion_tokens)


# -- operations routes -----------------------------------------------------


def _add_ops_routes(app: FastAPI, gateway: Gateway) -> None:
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async def readyz() -> Response:
        # Counts only: engine addresses are internal and never shown to clients.
        healthy = sum(e.healthy for e in gateway.engines)
        status = 200 if healthy else 503
        body = {"ready": bool(healthy), "engines": len(gateway.engines), "engines_healthy": healthy}
        return JSONResponse(body, status_code=status)

    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/readyz", readyz, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
