"""Composing adapter versions (``training.compose``), on the tenant's and the admin's
adapter routes:

- ``POST /{name}/compositions`` ``{"parents": [{"adapter": "a", "version": 1, "weight":
  0.7}, ...], "method": "ties", "density": 0.5}`` (optional ``seed``, ``target_rank``,
  ``majority_sign_method``, ``description``): the next version of adapter ``name``,
  made from the parents (the tenant's own versions on one base), answered as the push
  route answers a version (201). Its provenance names the parents, their weights and
  the method; it is evaluated, gated and promoted like any version.

Every problem with the request is answered at once with one 400 (``composition_rejected``)
before anything is written; a parent of another tenant reads exactly like an unknown one.

No ``from __future__ import annotations`` here: FastAPI must evaluate the
dependency annotations of the route functions at definition time.
"""

from collections.abc import Callable
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from registry import Actor, AdapterVersion, Registry
from server.errors import APIError
from training.compose import CompositionRejected, CompositionSpec, Parent, compose


class ParentBody(BaseModel):
    adapter: str = Field(min_length=1, max_length=128)
    """One of the tenant's adapter names."""
    version: int
    """Its version number."""
    weight: float
    """Factor of its weight change (negative subtracts it)."""


class CompositionBody(BaseModel):
    parents: list[ParentBody]
    method: str = "linear"
    """``linear``, ``ties``, ``dare_linear`` or ``dare_ties``; checked by
    ``training.compose`` so a wrong one gets the same precise 400 as every other problem."""
    density: float | None = None
    seed: int | None = None
    target_rank: int | None = None
    majority_sign_method: str | None = None
    description: str | None = None

    def spec(self) -> CompositionSpec:
        parents = [Parent(p.adapter, p.version, p.weight) for p in self.parents]
        return CompositionSpec(
            parents,
            self.method,
            density=self.density,
            seed=self.seed,
            target_rank=self.target_rank,
            majority_sign_method=self.majority_sign_method,
        )


class ActingScope(Protocol):
    """What these routes use of ``registry_routes.AdapterScope``."""

    registry: Registry
    tenant_id: int
    actor: Actor


def add_composition_routes(
    adapter_routes: APIRouter,
    scope_dep: Callable[..., ActingScope],
    version_json: Callable[[AdapterVersion], dict[str, Any]],
) -> None:
    """Add the composition route to ``adapter_routes``, acting for the tenant ``scope_dep``
    gives and answering versions in ``version_json``'s shape."""
    Acting = Annotated[ActingScope, Depends(scope_dep)]

    @adapter_routes.post(
        "/{name}/compositions",
        status_code=201,
        summary="Compose a new version from the tenant's versions (linear, TIES, DARE)",
    )
    def create_composition(scope: Acting, name: str, body: CompositionBody) -> dict[str, Any]:
        try:
            version = compose(
                scope.registry,
                scope.tenant_id,
                name,
                body.spec(),
                scope.actor,
                description=body.description,
            )
        except CompositionRejected as exc:
            raise APIError(400, str(exc), code="composition_rejected") from exc
        return version_json(version)
