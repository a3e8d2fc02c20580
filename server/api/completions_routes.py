"""OpenAI's stored chat completions, feedback on them, and the tenants' capture settings.

Tenant routes, in the shapes the official ``openai`` client parses
(``client.chat.completions.list/retrieve/update/delete``, ``...messages.list``):
``GET /v1/chat/completions`` (filters ``model``, ``metadata[key]=value``, and, beyond
OpenAI's, ``adapter``, ``version``, ``route``, ``created_after``/``created_before`` in
unix seconds), ``GET|POST|DELETE /v1/chat/completions/{id}`` and
``GET /v1/chat/completions/{id}/messages``. A stored completion is OpenAI's
``chat.completion`` plus its ``metadata`` and a ``loraplex`` object naming the adapter,
version and route that served it.

Feedback has no OpenAI shape; it follows the same style: ``POST`` and ``GET
/v1/chat/completions/{id}/feedback`` (thumbs, a 1-5 rating, a corrected answer, a note),
``GET /v1/feedback`` (all of the tenant's, filtered and paged) and
``GET /v1/feedback/export`` (the same as JSON lines, each with its completion).

A foreign completion or feedback id is answered exactly like an unknown one. Admins set
a tenant's capture with ``GET|PUT /admin/tenants/{tenant}/capture``.

No ``from __future__ import annotations`` here: FastAPI must evaluate the
dependency annotations of the route functions at definition time.
"""

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, StrictBool, StrictInt

from registry import Principal, tenant_ref
from registry.captures import (
    CaptureSettings,
    CaptureStore,
    CompletionQuery,
    Feedback,
    FeedbackInput,
    FeedbackQuery,
    Listing,
    StoredCompletion,
)
from server.api.auth import registry_of, require_admin, require_tenant
from server.api.erasure_routes import Erasures, erase
from server.errors import APIError

routes = APIRouter(tags=["stored completions"])
TenantPrincipal = Annotated[Principal, Depends(require_tenant)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]

EXPORT_PAGE = 500
"""Feedback read per query while an export streams."""
_LATEST = 253402300799  # 9999-12-31: later unix times do not fit a datetime
Limit = Annotated[int, Query(ge=1, le=100)]
Order = Annotated[Literal["asc", "desc"], Query()]
UnixTime = Annotated[int | None, Query(ge=0, le=_LATEST)]


def capture_store(request: Request) -> CaptureStore:
    """The app's ``CaptureStore`` (``app.state.capture_store``: the gateway's capture's)."""
    store: CaptureStore = request.app.state.capture_store
    return store


Captures = Annotated[CaptureStore, Depends(capture_store)]


def _tenant_id(principal: Principal) -> int:
    assert principal.tenant_id is not None  # require_tenant guarantees it
    return principal.tenant_id


def _when(unix: int | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(unix, dt.UTC) if unix is not None else None


def listing(
    created_after: UnixTime = None,
    created_before: UnixTime = None,
    after: str | None = None,
    limit: Limit = 20,
    order: Order = "asc",
) -> Listing:
    """Dependency: the time window and page a list takes. Its ``limit`` is one more than
    the client's, so the page knows whether more follow (``_page``)."""
    return Listing(_when(created_after), _when(created_before), after, limit + 1, order)


Listed = Annotated[Listing, Depends(listing)]


# -- shapes ------------------------------------------------------------------------


def completion_json(
    row: StoredCompletion, response: dict[str, Any], request: dict[str, Any]
) -> dict[str, Any]:
    return {
        **response,
        "id": row.completion_id,
        "object": "chat.completion",
        "metadata": row.metadata_,
        "request": {k: v for k, v in request.items() if k not in ("messages", "metadata")},
        "loraplex": {
            "adapter": row.adapter or None,
            "version": row.version,
            "route": row.route or None,
            "user": row.user,
            "stream": row.stream,
        },
    }


def message_json(completion_id: str, index: int, message: Any) -> dict[str, Any]:
    """One request message as OpenAI's ``ChatCompletionStoreMessage``."""
    message = message if isinstance(message, dict) else {"content": message}
    content = message.get("content")
    parts = content if isinstance(content, list) else None
    if parts is not None:
        texts = [p.get("text") for p in parts if isinstance(p, dict) and p.get("type") == "text"]
        content = "".join(t for t in texts if isinstance(t, str))
    return {**message, "id": f"{completion_id}-{index}", "content": content, "content_parts": parts}


def feedback_json(f: Feedback) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "chat.completion.feedback",
        "completion_id": f.completion_id,
        "created_at": int(f.created_at.timestamp()),
        "thumbs": f.thumbs,
        "rating": f.rating,
        "correction": f.correction,
        "note": f.note,
    }


def _page(items: list[dict[str, Any]], asked: int) -> dict[str, Any]:
    """A list object of the items a query for ``asked`` (one more than shown) found."""
    shown = items[: asked - 1]
    return {
        "object": "list",
        "data": shown,
        "has_more": len(items) > len(shown),
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
    }


def _stored(store: CaptureStore, row: StoredCompletion) -> dict[str, Any]:
    request, response = store.bodies(row)
    return completion_json(row, response, request)


def settings_json(tenant: str, settings: CaptureSettings) -> dict[str, Any]:
    return {"object": "tenant.capture", "tenant": tenant, **asdict(settings)}


# -- stored completions ------------------------------------------------------------


def _metadata_filter(request: Request) -> dict[str, str]:
    """``metadata[key]=value`` query parameters (how the ``openai`` client sends them)."""
    found = {}
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            found[name[len("metadata[") : -1]] = value
        elif name == "metadata":
            raise APIError(400, "filter by metadata as metadata[key]=value", param="metadata")
    return found


@routes.get("/v1/chat/completions", summary="List stored chat completions")
def list_completions(
    request: Request,
    principal: TenantPrincipal,
    store: Captures,
    listed: Listed,
    model: str | None = None,
    adapter: str | None = None,
    version: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
    route: str | None = None,
) -> dict[str, Any]:
    filters: dict[str, Any] = {"model": model, "adapter": adapter, "version": version}
    filters.update(route=route, metadata=_metadata_filter(request))
    query = CompletionQuery(**asdict(listed), **filters)
    rows = store.list_completions(_tenant_id(principal), query)
    return _page([_stored(store, row) for row in rows], listed.limit)


@routes.get("/v1/chat/completions/{completion_id}", summary="A stored chat completion")
def get_completion(completion_id: str, principal: TenantPrincipal, store: Captures) -> Any:
    return _stored(store, store.get(_tenant_id(principal), completion_id))


class MetadataBody(BaseModel):
    metadata: dict[str, Any] | None


@routes.post("/v1/chat/completions/{completion_id}", summary="Replace a completion's metadata")
def update_completion(
    completion_id: str, body: MetadataBody, principal: TenantPrincipal, store: Captures
) -> dict[str, Any]:
    row = store.update_metadata(_tenant_id(principal), completion_id, body.metadata or {})
    return _stored(store, row)


@routes.delete("/v1/chat/completions/{completion_id}", summary="Delete a stored completion")
def delete_completion(
    completion_id: str, principal: TenantPrincipal, erasures: Erasures
) -> dict[str, Any]:
    """Deleted with its feedback and erased from later dataset versions (an erasure)."""
    erasure = erase(erasures, principal, "completion", completion_id)
    return {
        "id": completion_id,
        "object": "chat.completion.deleted",
        "deleted": True,
        "erasure": erasure,
    }


def _message_cursor(completion_id: str, after: str | None) -> int | None:
    if after is None:
        return None
    number = after.removeprefix(f"{completion_id}-")
    if number == after or not (number.isascii() and number.isdigit()):
        message = f"after {after!r} is not a message id of this completion ({completion_id}-N)"
        raise APIError(400, message, param="after")
    return int(number)


@routes.get(
    "/v1/chat/completions/{completion_id}/messages", summary="A stored completion's messages"
)
def list_messages(
    completion_id: str,
    principal: TenantPrincipal,
    store: Captures,
    after: str | None = None,
    limit: Limit = 20,
    order: Order = "asc",
) -> dict[str, Any]:
    row = store.get(_tenant_id(principal), completion_id)
    request, _ = store.bodies(row)
    messages = request.get("messages")
    indexed = list(enumerate(messages if isinstance(messages, list) else []))
    if order == "desc":
        indexed.reverse()
    cursor = _message_cursor(completion_id, after)
    if cursor is not None:
        indexed = [(i, m) for i, m in indexed if (i > cursor if order == "asc" else i < cursor)]
    return _page([message_json(completion_id, i, m) for i, m in indexed[: limit + 1]], limit + 1)


# -- feedback ----------------------------------------------------------------------


class FeedbackBody(BaseModel):
    thumbs: Literal["up", "down"] | None = None
    rating: StrictInt | None = None
    correction: str | None = None
    note: str | None = None


@routes.post(
    "/v1/chat/completions/{completion_id}/feedback", summary="Give feedback on a completion"
)
def add_feedback(
    completion_id: str, body: FeedbackBody, principal: TenantPrincipal, store: Captures
) -> dict[str, Any]:
    given = FeedbackInput(body.thumbs, body.rating, body.correction, body.note)
    return feedback_json(store.add_feedback(_tenant_id(principal), completion_id, given))


@routes.get("/v1/chat/completions/{completion_id}/feedback", summary="A completion's feedback")
def completion_feedback(
    completion_id: str, principal: TenantPrincipal, store: Captures, listed: Listed
) -> dict[str, Any]:
    return list_feedback(principal, store, listed, completion_id)


@routes.get("/v1/feedback", summary="All of your feedback, filtered")
def list_feedback(
    principal: TenantPrincipal,
    store: Captures,
    listed: Listed,
    completion_id: str | None = None,
    thumbs: Literal["up", "down"] | None = None,
) -> dict[str, Any]:
    query = FeedbackQuery(**asdict(listed), completion_id=completion_id, thumbs=thumbs)
    found = store.list_feedback(_tenant_id(principal), query)
    return _page([feedback_json(f) for f in found], listed.limit)


@routes.get(
    "/v1/feedback/export",
    summary="Your feedback as JSON lines, each with the completion it is about",
    response_class=StreamingResponse,
)
def export_feedback(
    principal: TenantPrincipal,
    store: Captures,
    completion_id: str | None = None,
    thumbs: Literal["up", "down"] | None = None,
    created_after: UnixTime = None,
    created_before: UnixTime = None,
) -> Any:
    tenant_id = _tenant_id(principal)
    if completion_id is not None:
        store.get(tenant_id, completion_id)  # a 404 now, not a broken stream later
    window = Listing(_when(created_after), _when(created_before), limit=EXPORT_PAGE)
    filters = FeedbackQuery(**asdict(window), completion_id=completion_id, thumbs=thumbs)
    headers = {"content-disposition": 'attachment; filename="feedback.jsonl"'}
    lines = _export_lines(store, tenant_id, filters)
    return StreamingResponse(lines, media_type="application/jsonl", headers=headers)


def _export_lines(store: CaptureStore, tenant_id: int, filters: FeedbackQuery) -> Iterator[bytes]:
    query = filters
    while True:
        page = store.list_feedback(tenant_id, query)
        for item, row in store.with_completions(tenant_id, page):
            request, response = store.bodies(row)
            line = {
                **feedback_json(item),
                "completion": completion_json(row, response, request),
                "messages": request.get("messages"),
            }
            yield json.dumps(line).encode() + b"\n"
        if len(page) < query.limit:
            return
        query = replace(query, after=page[-1].id)


# -- capture settings (admins) -----------------------------------------------------


class CaptureBody(BaseModel):
    enabled: StrictBool
    store_by_default: StrictBool = False
    retention_days: StrictInt = CaptureSettings.retention_days
    max_body_bytes: StrictInt = CaptureSettings.max_body_bytes


@routes.get("/admin/tenants/{tenant}/capture", summary="A tenant's capture settings")
def get_capture(tenant: str, request: Request, _: AdminPrincipal, store: Captures) -> Any:
    row = registry_of(request).get_tenant(tenant_ref(tenant))
    assert row.id is not None
    return settings_json(row.name, store.settings(row.id))


@routes.put(
    "/admin/tenants/{tenant}/capture", summary="Replace a tenant's capture settings (opt-in)"
)
def set_capture(
    tenant: str, body: CaptureBody, principal: AdminPrincipal, store: Captures
) -> dict[str, Any]:
    settings = CaptureSettings(**body.model_dump())
    name, stored = store.set_settings(tenant_ref(tenant), settings, principal.actor)
    return settings_json(name, stored)
