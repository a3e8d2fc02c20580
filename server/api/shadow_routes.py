"""Shadow traffic of an adapter (``registry.shadow``), on the tenant's and the admin's
adapter routes:

- ``POST /{name}/shadow`` ``{"version": N, "share": 0.2}``: copy that share of
  production's requests to version N (its answers compared, never returned);
- ``GET /{name}/shadow``: the shadow alias and its candidate's results against the
  current production version (``compared``, ``agreement``, ``json_valid``, tokens...);
- ``DELETE /{name}/shadow``: stop the copies (the results stay);
- ``POST /{name}/shadow/evals`` ``{"version": N}`` (optional; the shadow's version by
  default): record those results as the version's eval results in suite ``shadow``,
  which promotion gates can use.

No ``from __future__ import annotations`` here: FastAPI must evaluate the
dependency annotations of the route functions at definition time.
"""

from collections.abc import Callable
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from registry import Actor, Registry
from registry.shadow import ShadowStore


class ShadowBody(BaseModel):
    version: int
    share: float = Field(gt=0.0, le=1.0)
    """Share of production's requests copied to the version."""


class ShadowEvalBody(BaseModel):
    version: int | None = None
    """The version whose results to record; the shadow alias's version by default."""


class ActingScope(Protocol):
    """What these routes use of ``registry_routes.AdapterScope``."""

    registry: Registry
    tenant_id: int
    actor: Actor

    def before_traffic(self, adapter: str, number: int) -> None: ...


def add_shadow_routes(adapter_routes: APIRouter, scope_dep: Callable[..., ActingScope]) -> None:
    """Add the shadow routes to ``adapter_routes``, acting for the tenant ``scope_dep`` gives."""
    Acting = Annotated[ActingScope, Depends(scope_dep)]

    @adapter_routes.post("/{name}/shadow", summary="Copy a share of production's traffic")
    def set_shadow(scope: Acting, name: str, body: ShadowBody) -> dict[str, Any]:
        scope.before_traffic(name, body.version)
        scope.registry.set_shadow(scope.tenant_id, name, body.version, body.share, scope.actor)
        return ShadowStore(scope.registry).status(scope.tenant_id, name).to_json()

    @adapter_routes.get("/{name}/shadow", summary="Show the shadow and its results")
    def get_shadow(scope: Acting, name: str) -> dict[str, Any]:
        return ShadowStore(scope.registry).status(scope.tenant_id, name).to_json()

    @adapter_routes.delete("/{name}/shadow", status_code=204, summary="Stop the shadow copies")
    def clear_shadow(scope: Acting, name: str) -> None:
        scope.registry.clear_shadow(scope.tenant_id, name, scope.actor)

    @adapter_routes.post(
        "/{name}/shadow/evals", summary="Record shadow results as a version's eval results"
    )
    def record_shadow_evals(
        scope: Acting, name: str, body: ShadowEvalBody | None = None
    ) -> dict[str, Any]:
        number = body.version if body is not None else None
        store = ShadowStore(scope.registry)
        results = store.record_eval(scope.tenant_id, name, number, scope.actor)
        data = [{"object": "eval_result", **r.model_dump(mode="json")} for r in results]
        return {"object": "list", "data": data}
