"""The lifecycle event log over HTTP (``registry.events``), read with a cursor:

- ``GET /v1/events?after=ID&limit=N&type=T`` (tenant keys): the caller's own events and
  the platform's (``base.*``), oldest first, with ids above ``after``;
- ``GET /v1/events/{id}``: one of them (a foreign event is answered exactly like an
  unknown one: 404, the same message);
- ``GET /admin/events?after=ID&tenant=T`` (admin keys): every tenant's, or one's.

A page is ``{"object": "list", "data": [...], "has_more", "last_id"}``: pass ``last_id``
back as ``after`` for the next one.

No ``from __future__ import annotations`` here: FastAPI must evaluate the
dependency annotations of the route functions at definition time.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from registry import Principal, tenant_ref
from registry.events import MAX_LIMIT, Event, EventLog
from server.api.auth import registry_of, require_admin, require_tenant

routes = APIRouter(tags=["events"])
TenantPrincipal = Annotated[Principal, Depends(require_tenant)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]
After = Annotated[int, Query(ge=0, description="return events with ids above this one")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
Types = Annotated[list[str] | None, Query(alias="type", description="only these event types")]


def event_log(request: Request) -> EventLog:
    return EventLog(registry_of(request))


Log = Annotated[EventLog, Depends(event_log)]


def page(log: EventLog, tenant_id: int | None, after: int, limit: int, types: list[str] | None
         ) -> dict[str, Any]:  # fmt: skip
    events: list[Event] = log.read(tenant_id, after, limit + 1, types)
    shown = events[:limit]
    return {
        "object": "list",
        "data": [e.to_json() for e in shown],
        "has_more": len(events) > limit,
        "last_id": shown[-1].id if shown else after,
    }


@routes.get("/v1/events", summary="Your lifecycle events after a cursor")
def list_events(
    principal: TenantPrincipal, log: Log, after: After = 0, limit: Limit = 100, type: Types = None
) -> dict[str, Any]:
    return page(log, principal.tenant_id, after, limit, type)


@routes.get("/v1/events/{event_id}", summary="One of your lifecycle events")
def get_event(principal: TenantPrincipal, log: Log, event_id: int) -> dict[str, Any]:
    assert principal.tenant_id is not None  # require_tenant guarantees it
    return log.get(principal.tenant_id, event_id).to_json()


@routes.get("/admin/events", summary="Every tenant's lifecycle events after a cursor")
def list_all_events(
    _: AdminPrincipal,
    log: Log,
    request: Request,
    after: After = 0,
    limit: Limit = 100,
    tenant: str | None = None,
    type: Types = None,
) -> dict[str, Any]:
    if tenant is None:
        return page(log, None, after, limit, type)
    tenant_id = registry_of(request).get_tenant(tenant_ref(tenant)).id
    return page(log, tenant_id, after, limit, type)
