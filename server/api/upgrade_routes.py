"""Base upgrades over HTTP (``registry.upgrades``): admin routes run them, tenants answer.

Admin (an admin key):

- ``POST /admin/bases/upgrades`` ``{"old_base", "new_base", "dry_run"?, "deadline"?,
  "uploaded_past_deadline"?, "unanswered_past_deadline"?, "canary_weight"?,
  "canary_seconds"?, "bar_margin"?, "retire_grace_seconds"?}``: with ``dry_run`` the plan
  (``base.upgrade.plan``: every adapter served on the old base, trained or uploaded, its
  data, suites and gates), writing nothing; else the upgrade started (``base.upgrade``);
- ``GET /admin/bases/upgrades`` (newest first) and ``GET /admin/bases/upgrades/{id}``: the
  upgrade, its per-adapter items (state, jobs, scores, new version, deadline, note),
  progress and, once ended, its report;
- ``POST /admin/bases/upgrades/{id}/advance``: take every step possible now (the workers do
  this every few seconds too) and say which; ``POST .../cancel``: stop it.

Tenant (a tenant key): ``GET /v1/upgrades``, the upgrades moving the caller's adapters
with only the caller's items; ``POST /v1/upgrades/{id}/adapters/{name}/choice``
``{"choice": "retire" | "retrain"}``, the owner's answer where the new base alone meets the
adapter's bar. Another tenant's adapter is answered exactly like one not in the upgrade.

No ``from __future__ import annotations`` here: FastAPI must evaluate the
dependency annotations of the route functions at definition time.
"""

import dataclasses
import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from registry import Principal
from registry.upgrades import (
    UpgradeOptions,
    UpgradeStore,
    UpgradeTransition,
    UpgradeView,
    item_json,
)
from server.api.auth import registry_of, require_admin, require_tenant

routes = APIRouter(tags=["base upgrades"])
AdminPrincipal = Annotated[Principal, Depends(require_admin)]
TenantPrincipal = Annotated[Principal, Depends(require_tenant)]
_DEFAULTS = UpgradeOptions()


def _store(request: Request) -> UpgradeStore:
    return UpgradeStore(registry_of(request))


Upgrades = Annotated[UpgradeStore, Depends(_store)]


class UpgradeBody(BaseModel):
    # Unknown fields (a misspelt option) are refused, not silently dropped.
    model_config = ConfigDict(extra="forbid")

    old_base: str
    new_base: str
    dry_run: bool = False
    deadline: dt.datetime | None = None
    # Plain strings: ``UpgradeOptions.problems`` names every bad value at once, in the
    # error shape every route answers with.
    uploaded_past_deadline: str = _DEFAULTS.uploaded_past_deadline
    unanswered_past_deadline: str = _DEFAULTS.unanswered_past_deadline
    canary_weight: float = _DEFAULTS.canary_weight
    canary_seconds: float = _DEFAULTS.canary_seconds
    bar_margin: float = _DEFAULTS.bar_margin
    retire_grace_seconds: float = _DEFAULTS.retire_grace_seconds

    def options(self) -> UpgradeOptions:
        names = {f.name for f in dataclasses.fields(UpgradeOptions)}
        return UpgradeOptions(**{n: v for n, v in self.model_dump().items() if n in names})


class ChoiceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    choice: str
    """``retire`` or ``retrain`` (anything else: a 400 saying so)."""


def tenant_json(view: UpgradeView) -> dict[str, Any]:
    """An upgrade as one tenant sees it: its own items; no report naming other tenants."""
    row = view.row
    return {
        "object": "base.upgrade",
        "id": row.id,
        "old_base": view.old,
        "new_base": view.new,
        "state": row.state,
        "deadline": row.options.get("deadline"),
        "items": [item_json(item, tenant) for item, tenant in view.items],
    }


def _advanced(view: UpgradeView, moved: list[UpgradeTransition]) -> dict[str, Any]:
    return {
        "object": "base.upgrade.advance",
        "transitions": [t.to_json() for t in moved],
        "upgrade": view.to_json(),
    }


@routes.post("/admin/bases/upgrades")
def start_upgrade(body: UpgradeBody, principal: AdminPrincipal, store: Upgrades) -> dict[str, Any]:
    if body.dry_run:
        return store.plan(body.old_base, body.new_base).to_json()
    return store.start(body.old_base, body.new_base, body.options(), principal.actor).to_json()


@routes.get("/admin/bases/upgrades")
def list_upgrades(principal: AdminPrincipal, store: Upgrades) -> dict[str, Any]:
    data = [view.to_json() for view in store.list_upgrades()]
    return {"object": "list", "data": data, "has_more": False}


@routes.get("/admin/bases/upgrades/{upgrade_id}")
def get_upgrade(upgrade_id: str, principal: AdminPrincipal, store: Upgrades) -> dict[str, Any]:
    return store.get(upgrade_id).to_json()


@routes.post("/admin/bases/upgrades/{upgrade_id}/advance")
def advance_upgrade(upgrade_id: str, principal: AdminPrincipal, store: Upgrades) -> dict[str, Any]:
    moved = store.advance(upgrade_id)
    return _advanced(store.get(upgrade_id), moved)


@routes.post("/admin/bases/upgrades/{upgrade_id}/cancel")
def cancel_upgrade(upgrade_id: str, principal: AdminPrincipal, store: Upgrades) -> dict[str, Any]:
    return store.cancel(upgrade_id, principal.actor).to_json()


@routes.get("/v1/upgrades")
def my_upgrades(principal: TenantPrincipal, store: Upgrades) -> dict[str, Any]:
    assert principal.tenant_id is not None  # require_tenant guarantees it
    data = [tenant_json(view) for view in store.for_tenant(principal.tenant_id)]
    return {"object": "list", "data": data, "has_more": False}


@routes.post("/v1/upgrades/{upgrade_id}/adapters/{adapter}/choice")
def choose(
    upgrade_id: str, adapter: str, body: ChoiceBody, principal: TenantPrincipal, store: Upgrades
) -> dict[str, Any]:
    assert principal.tenant_id is not None
    view = store.choose(principal.tenant_id, upgrade_id, adapter, body.choice, principal.actor)
    return tenant_json(view)
