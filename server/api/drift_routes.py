"""Prompt drift of a tenant's adapter: ``GET /v1/adapters/{name}/drift`` (``registry.drift``).

The answer is the adapter's drift over the last ``days`` (7 unless asked; 1 to 90): the
score (0 to 1; null while unknown, with the reason), the live and reference prompt
counts, the production version compared against, the gateway's threshold
(``LORAPLEX_DRIFT_THRESHOLD``) and whether the score is past it, and the state of the
gateways' last check (past the threshold since when). A foreign adapter is answered
exactly like an unknown one (404).

No ``from __future__ import annotations`` here: FastAPI must evaluate the
dependency annotations of the route functions at definition time.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from registry import Principal
from registry.drift import DEFAULT_DAYS, DEFAULT_THRESHOLD, DriftState, DriftStore
from server.api.auth import registry_of, require_tenant

routes = APIRouter(tags=["drift"])
TenantPrincipal = Annotated[Principal, Depends(require_tenant)]


def drift_store(request: Request) -> DriftStore:
    """The app's ``DriftStore`` (``app.state.drift_store``), made on first use."""
    store: DriftStore | None = getattr(request.app.state, "drift_store", None)
    if store is None:
        store = DriftStore(registry_of(request))
        request.app.state.drift_store = store
    return store


Drifts = Annotated[DriftStore, Depends(drift_store)]


def _threshold(request: Request) -> float:
    """The gateway's ``drift_threshold`` (``app.state.drift_threshold``)."""
    return float(getattr(request.app.state, "drift_threshold", DEFAULT_THRESHOLD))


def state_json(state: DriftState | None) -> dict[str, Any] | None:
    if state is None:
        return None
    changed = state.changed_at
    return {
        "over_threshold": state.over,
        "score": state.score,
        "since": int(changed.timestamp()) if changed is not None else None,
        "checked_at": int(state.checked_at.timestamp()),
    }


@routes.get("/v1/adapters/{name}/drift")
def get_drift(
    name: str, principal: TenantPrincipal, store: Drifts, request: Request, days: int = DEFAULT_DAYS
) -> dict[str, Any]:
    assert principal.tenant_id is not None  # require_tenant guarantees it
    report = store.report(principal.tenant_id, name, days, _threshold(request))
    last = store.state(principal.tenant_id, name)
    return {"object": "adapter.drift", **report.to_json(), "last_check": state_json(last)}
