"""Erasure routes: delete a file, a stored completion or an end user's records, see what
they had reached, and retrain without them (``registry.erasures``).

``DELETE /v1/files/{id}`` answers OpenAI's ``file.deleted`` shape (``client.files.delete``)
and ``DELETE /v1/chat/completions/{id}`` its ``chat.completion.deleted`` (that route lives
with the stored completions and erases through here); both add the ``erasure`` record.
``POST /v1/erasures`` ``{"user": ...}`` (or ``"file"``, ``"completion"``) erases by
subject; ``GET /v1/erasures[/{id}]`` lists and shows them; ``POST
/v1/erasures/{id}/retrain`` queues the jobs that retrain without the erased data.

No ``from __future__ import annotations`` here: FastAPI must evaluate the
dependency annotations of the route functions at definition time.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from registry import Principal
from registry.erasures import Erasure, ErasureStore, Subject
from server.api.auth import require_tenant
from server.api.jobs_routes import job_json, job_store
from server.errors import APIError

routes = APIRouter(tags=["erasure"])
TenantPrincipal = Annotated[Principal, Depends(require_tenant)]


def erasure_store(request: Request) -> ErasureStore:
    """The app's ``ErasureStore`` (``app.state.erasure_store``), made on first use."""
    store: ErasureStore | None = getattr(request.app.state, "erasure_store", None)
    if store is None:
        store = ErasureStore(job_store(request))
        request.app.state.erasure_store = store
    return store


Erasures = Annotated[ErasureStore, Depends(erasure_store)]


def _tenant_id(principal: Principal) -> int:
    assert principal.tenant_id is not None  # require_tenant guarantees it
    return principal.tenant_id


def erasure_json(record: Erasure) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "erasure",
        "kind": record.kind,
        "subject": record.subject,
        "created_at": int(record.created_at.timestamp()),
        "lineage": record.lineage,
        "retrain_jobs": record.retrain_jobs,
    }


def erase(store: ErasureStore, principal: Principal, kind: str, value: str) -> dict[str, Any]:
    """Erase one subject for the principal's tenant; the erasure record as JSON."""
    subject = Subject(kind, value)  # type: ignore[arg-type]  # checked by Subject itself
    return erasure_json(store.erase(_tenant_id(principal), subject, principal.actor))


class ErasureBody(BaseModel):
    user: str | None = None
    file: str | None = None
    completion: str | None = None


@routes.delete("/v1/files/{file_id}", summary="Delete a file and erase its examples")
def delete_file(file_id: str, principal: TenantPrincipal, store: Erasures) -> dict[str, Any]:
    erasure = erase(store, principal, "file", file_id)
    return {"id": file_id, "object": "file", "deleted": True, "erasure": erasure}


@routes.post("/v1/erasures", summary="Erase a user's records, a file or a completion")
def create_erasure(
    body: ErasureBody, principal: TenantPrincipal, store: Erasures
) -> dict[str, Any]:
    given = {k: v for k, v in body.model_dump().items() if v is not None}
    if len(given) != 1:
        raise APIError(
            400,
            "name exactly one of 'user', 'file' or 'completion' to erase",
            param="user" if not given else sorted(given)[1],
        )
    [(kind, value)] = given.items()
    return erase(store, principal, kind, value)


@routes.get("/v1/erasures", summary="List erasures")
def list_erasures(principal: TenantPrincipal, store: Erasures) -> dict[str, Any]:
    records = store.list_erasures(_tenant_id(principal))
    return {"object": "list", "data": [erasure_json(r) for r in records], "has_more": False}


@routes.get("/v1/erasures/{erasure_id}", summary="Show an erasure and its lineage")
def get_erasure(erasure_id: str, principal: TenantPrincipal, store: Erasures) -> dict[str, Any]:
    return erasure_json(store.get(_tenant_id(principal), erasure_id))


@routes.post("/v1/erasures/{erasure_id}/retrain", summary="Retrain without the erased data")
def retrain(erasure_id: str, principal: TenantPrincipal, store: Erasures) -> dict[str, Any]:
    jobs = store.retrain(_tenant_id(principal), erasure_id, principal.actor)
    return {"object": "list", "data": [job_json(job) for job in jobs], "has_more": False}
