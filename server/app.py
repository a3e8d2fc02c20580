"""The gateway process's app: the gateway's serving side plus the REST APIs beside it.

The one place that composes ``server.gateway`` (inference, engines, metrics)
with ``server.api`` (registry and fine-tuning routes), so neither imports the other.
"""

from __future__ import annotations

from fastapi import FastAPI

from registry import Registry
from server.api.capability_routes import routes as capability_router
from server.api.completions_routes import routes as completions_router
from server.api.datasets_routes import routes as datasets_router
from server.api.drift_routes import routes as drift_router
from server.api.erasure_routes import routes as erasure_router
from server.api.events_routes import routes as events_router
from server.api.jobs_routes import routes as jobs_router
from server.api.registry_routes import routes as registry_router
from server.api.retraining_routes import routes as retraining_router
from server.api.routed_model_routes import routes as routed_model_router
from server.api.upgrade_routes import routes as upgrade_router
from server.api.usage_routes import routes as usage_router
from server.api.webhook_routes import routes as webhook_router
from server.config import Settings
from server.gateway.app import create_gateway
from server.gateway.engines import EngineSupervisor
from server.gateway.replicas import Engine
from server.webhooks import attach as attach_webhooks


def create_app(
    settings: Settings,
    registry: Registry,
    engines: list[Engine] | None = None,
    supervisors: list[EngineSupervisor] | None = None,
) -> FastAPI:
    """The whole gateway app: ``supervisors`` to run engines, or ``engines`` to use running ones."""
    app = create_gateway(settings, registry, engines, supervisors)
    app.include_router(registry_router)
    app.include_router(capability_router)
    app.include_router(jobs_router)
    app.include_router(retraining_router)
    app.include_router(completions_router)
    app.include_router(erasure_router)
    app.include_router(datasets_router)
    app.include_router(drift_router)
    app.include_router(usage_router)
    app.include_router(events_router)
    app.include_router(webhook_router)
    app.include_router(routed_model_router)
    app.include_router(upgrade_router)
    attach_webhooks(app, settings, registry)  # the SSRF guard, and the deliverer's loop
    return app
