"""Webhook subscriptions of a tenant over HTTP (``registry.webhooks``), tenant keys only:

- ``POST /v1/webhooks`` ``{"url", "events": [...], "description"}``: subscribe ``url`` to
  those event types (none given: every type); the answer carries the signing ``secret``,
  shown this once;
- ``GET /v1/webhooks``, ``GET /v1/webhooks/{id}``, ``DELETE /v1/webhooks/{id}``;
- ``POST /v1/webhooks/{id}/rotate-secret`` ``{"grace_seconds": 86400}``: a new secret
  (shown once); the old one keeps signing beside it for the grace period;
- ``GET /v1/webhooks/{id}/deliveries?state=pending|delivered|dead``: the delivery log;
- ``POST /v1/webhooks/{id}/deliveries/{delivery_id}/redeliver``: a dead delivery again.

The URL is checked by the app's SSRF guard (``app.state.webhook_guard``, set by
``server.webhooks.attach``; without one, nothing can subscribe): a refused target is a
400 saying why. A foreign subscription is answered exactly like an unknown one.

No ``from __future__ import annotations`` here: FastAPI must evaluate the
dependency annotations of the route functions at definition time.
"""

import datetime as dt
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from registry import Principal
from registry.webhooks import (
    DEFAULT_GRACE,
    DEFAULT_MAX_PER_TENANT,
    MAX_URL_LENGTH,
    WebhookStore,
    WebhookSubscription,
    delivery_json,
)
from server.api.auth import registry_of, require_tenant
from server.errors import APIError

routes = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
TenantPrincipal = Annotated[Principal, Depends(require_tenant)]


class WebhookBody(BaseModel):
    url: str = Field(max_length=MAX_URL_LENGTH)
    events: list[str] = Field(default_factory=list, max_length=64)
    """Event types to send (``GET /v1/events`` shows them); empty: every type."""
    description: str = Field(default="", max_length=256)


class RotateBody(BaseModel):
    grace_seconds: int = Field(default=int(DEFAULT_GRACE.total_seconds()), ge=0, le=7 * 86400)
    """How long the old secret keeps signing beside the new one."""


class TargetGuard(Protocol):
    """What these routes use of ``server.webhooks.ssrf.Guard``: ``check`` raises a
    ``ValueError`` saying why a URL is refused."""

    def check(self, url: str) -> object: ...


def webhook_store(request: Request) -> WebhookStore:
    most = getattr(request.app.state, "webhook_max_per_tenant", DEFAULT_MAX_PER_TENANT)
    return WebhookStore(registry_of(request), most)


Webhooks = Annotated[WebhookStore, Depends(webhook_store)]


def check_target(request: Request, url: str) -> None:
    guard: TargetGuard | None = getattr(request.app.state, "webhook_guard", None)
    if guard is None:
        raise APIError(503, "Webhooks are not enabled on this server.", code="webhooks_disabled")
    try:
        guard.check(url)
    except ValueError as exc:
        raise APIError(400, str(exc), code="webhook_target_refused", param="url") from None


def _unix(value: dt.datetime | None) -> int | None:
    if value is None:
        return None
    return int((value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp())


def webhook_json(sub: WebhookSubscription, secret: bool = False) -> dict[str, Any]:
    shown = {
        "object": "webhook",
        "id": sub.id,
        "url": sub.url,
        "events": sub.event_types,
        "description": sub.description,
        "created_at": _unix(sub.created_at),
        "previous_secret_expires_at": _unix(sub.previous_expires_at),
    }
    return {**shown, "secret": sub.secret} if secret else shown


def _tenant(principal: Principal) -> int:
    assert principal.tenant_id is not None  # require_tenant guarantees it
    return principal.tenant_id


@routes.post("", status_code=201, summary="Subscribe a URL to lifecycle events")
def create_webhook(
    principal: TenantPrincipal, store: Webhooks, request: Request, body: WebhookBody
) -> dict[str, Any]:
    check_target(request, body.url)
    sub = store.create(_tenant(principal), body.url, body.events, body.description)
    return webhook_json(sub, secret=True)


@routes.get("", summary="List your webhooks")
def list_webhooks(principal: TenantPrincipal, store: Webhooks) -> dict[str, Any]:
    subs = store.subscriptions(_tenant(principal))
    return {"object": "list", "data": [webhook_json(s) for s in subs]}


@routes.get("/{webhook_id}", summary="Show a webhook")
def get_webhook(principal: TenantPrincipal, store: Webhooks, webhook_id: str) -> dict[str, Any]:
    return webhook_json(store.get(_tenant(principal), webhook_id))


@routes.delete("/{webhook_id}", status_code=204, summary="Delete a webhook and its log")
def delete_webhook(principal: TenantPrincipal, store: Webhooks, webhook_id: str) -> None:
    store.delete(_tenant(principal), webhook_id)


@routes.post("/{webhook_id}/rotate-secret", summary="Replace a webhook's signing secret")
def rotate_secret(
    principal: TenantPrincipal, store: Webhooks, webhook_id: str, body: RotateBody | None = None
) -> dict[str, Any]:
    grace = dt.timedelta(seconds=(body or RotateBody()).grace_seconds)
    return webhook_json(store.rotate(_tenant(principal), webhook_id, grace), secret=True)


@routes.get("/{webhook_id}/deliveries", summary="A webhook's delivery log, newest first")
def list_deliveries(
    principal: TenantPrincipal, store: Webhooks, webhook_id: str, state: str | None = None,
    limit: int = 100,
) -> dict[str, Any]:  # fmt: skip
    rows = store.deliveries(_tenant(principal), webhook_id, state, max(1, limit))
    return {"object": "list", "data": [delivery_json(r) for r in rows]}


@routes.post(
    "/{webhook_id}/deliveries/{delivery_id}/redeliver", summary="Send a dead delivery again"
)
def redeliver(
    principal: TenantPrincipal, store: Webhooks, webhook_id: str, delivery_id: str
) -> dict[str, Any]:
    return delivery_json(store.redeliver(_tenant(principal), webhook_id, delivery_id))
