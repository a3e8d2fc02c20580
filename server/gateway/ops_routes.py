"""Operations routes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import secrets

from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from server.errors import APIError
from server.gateway.metrics import Metrics
from server.gateway.replicas import Replicas


def add(app: FastAPI, replicas: Replicas, metrics: Metrics, metrics_token: str) -> None:
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async def readyz() -> Response:
        # Counts only: engine addresses are internal and never shown to clients.
        healthy = replicas.healthy_count()
        status = 200 if healthy else 503
        body = {
            "ready": bool(healthy),
            "engines": len(replicas.engines),
            "engines_healthy": healthy,
        }
        return JSONResponse(body, status_code=status)

    async def scrape(request: Request) -> Response:
        if not metrics_allowed(request, metrics_token):
            return APIError(
                403,
                "/metrics is served to loopback clients, or with the bearer token the "
                "operator set in LORAPLEX_METRICS_TOKEN.",
            ).response()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/readyz", readyz, methods=["GET"])
    app.add_api_route("/metrics", scrape, methods=["GET"])


def metrics_allowed(request: Request, token: str) -> bool:
    """Metrics labels name every tenant and adapter: not for whoever reaches the gateway."""
    if token:
        sent = request.headers.get("authorization", "")
        return secrets.compare_digest(sent.encode(), f"Bearer {token}".encode())
    host = request.client.host if request.client else ""
    return host in ("127.0.0.1", "::1", "localhost")
