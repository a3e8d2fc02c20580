"""Webhook delivery, the gateway's side: signing, the SSRF guard and the delivery loop.

``attach`` wires them into the gateway process's app: the routes check targets with
the app's guard (``app.state.webhook_guard``), and the deliverer runs for as long as
the app's lifespan does. The subscriptions and the queue are ``registry.webhooks``'.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from registry import Registry
from registry.webhooks import Backoff, WebhookStore
from server.config import Settings
from server.webhooks.delivery import Deliverer
from server.webhooks.ssrf import Guard


def deliverer_for(settings: Settings, registry: Registry, guard: Guard) -> Deliverer:
    backoff = Backoff(settings.webhook_backoff, settings.webhook_backoff_max,
                      settings.webhook_max_attempts)  # fmt: skip
    store = WebhookStore(registry, settings.webhook_max_per_tenant)
    return Deliverer(store, guard, backoff, settings.webhook_timeout, settings.webhook_interval)


def attach(app: FastAPI, settings: Settings, registry: Registry) -> None:
    """Give ``app`` the SSRF guard and the webhook limits, and run a deliverer in its lifespan."""
    guard = Guard(settings.webhook_allow)
    app.state.webhook_guard = guard
    app.state.webhook_max_per_tenant = settings.webhook_max_per_tenant
    deliverer = deliverer_for(settings, registry, guard)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with inner(app) as state:
            task = asyncio.create_task(deliverer.run(), name="webhook-deliverer")
            try:
                yield state
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app.router.lifespan_context = lifespan
