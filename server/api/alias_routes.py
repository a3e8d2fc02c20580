"""Custom aliases and version tags (``registry.custom_aliases``, ``registry.version_tags``),
on the tenant's and the admin's adapter routes:

- ``PUT /{name}/aliases/{alias}`` ``{"version": N}``: point a custom alias (``staging``)
  at version N, pre-warmed first like a promote; requests name it ``name:alias``;
- ``DELETE /{name}/aliases/{alias}``: remove it (204);
- ``GET /{name}/aliases``: every alias, built-in ones included; ``GET
  /{name}/aliases/{alias}``: one, with its history;
- ``PUT /{name}/versions/{n}/tags`` ``{"tags": {"k": "v"}}``: merge tags into version n's;
  ``DELETE /{name}/versions/{n}/tags/{key}``; ``GET /{name}/versions/{n}/tags``;
- ``GET ?tag=k=v&tag=k2&alias=staging`` on the adapter listing itself: the versions that
  match every filter (``search_listing``, called from ``registry_routes``).

Refusals are the registry's errors in OpenAI's shape; another tenant's adapter answers
exactly like an unknown one.

No ``from __future__ import annotations`` here: FastAPI must evaluate the
dependency annotations of the route functions at definition time.
"""

from collections.abc import Callable
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from registry import Actor, AdapterVersion, Registry
from registry.custom_aliases import CustomAliases, check_alias_name
from registry.version_tags import VersionTags, parse_tag_filter

VersionJson = Callable[[AdapterVersion], dict[str, Any]]


class AliasBody(BaseModel):
    version: int
    """The version the alias points at."""


class TagsBody(BaseModel):
    tags: dict[str, str]
    """Tags to set (merged into the version's): key -> value (``registry.version_tags``
    bounds them, and says how when it refuses)."""


class ActingScope(Protocol):
    """What these routes use of ``registry_routes.AdapterScope``."""

    registry: Registry
    tenant_id: int
    actor: Actor

    def before_traffic(self, adapter: str, number: int) -> None: ...


def _listing(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": items}


def add_alias_routes(adapter_routes: APIRouter, scope_dep: Callable[..., ActingScope]) -> None:
    """Add the alias and tag routes to ``adapter_routes``, acting for ``scope_dep``'s tenant."""
    Acting = Annotated[ActingScope, Depends(scope_dep)]

    @adapter_routes.get("/{name}/aliases", summary="List an adapter's aliases")
    def list_aliases(scope: Acting, name: str) -> dict[str, Any]:
        found = CustomAliases(scope.registry).list_aliases(scope.tenant_id, name)
        return _listing([a.to_json() for a in found])

    @adapter_routes.get("/{name}/aliases/{alias}", summary="Show an alias and its history")
    def get_alias(scope: Acting, name: str, alias: str) -> dict[str, Any]:
        return CustomAliases(scope.registry).get_alias(scope.tenant_id, name, alias).to_json()

    @adapter_routes.put("/{name}/aliases/{alias}", summary="Point a custom alias at a version")
    def set_alias(scope: Acting, name: str, alias: str, body: AliasBody) -> dict[str, Any]:
        check_alias_name(alias)  # before pre-warming anything for a name that is refused
        scope.before_traffic(name, body.version)
        store = CustomAliases(scope.registry)
        return store.set_alias(scope.tenant_id, name, alias, body.version, scope.actor).to_json()

    @adapter_routes.delete(
        "/{name}/aliases/{alias}", status_code=204, summary="Delete a custom alias"
    )
    def delete_alias(scope: Acting, name: str, alias: str) -> None:
        CustomAliases(scope.registry).delete_alias(scope.tenant_id, name, alias, scope.actor)

    _add_tag_routes(adapter_routes, scope_dep)


def _add_tag_routes(adapter_routes: APIRouter, scope_dep: Callable[..., ActingScope]) -> None:
    Acting = Annotated[ActingScope, Depends(scope_dep)]

    def tags_json(name: str, number: int, tags: dict[str, str]) -> dict[str, Any]:
        return {"object": "adapter.version.tags", "adapter": name, "version": number, "tags": tags}

    @adapter_routes.get("/{name}/versions/{number}/tags", summary="Show a version's tags")
    def get_tags(scope: Acting, name: str, number: int) -> dict[str, Any]:
        tags = VersionTags(scope.registry).tags(scope.tenant_id, name, number)
        return tags_json(name, number, tags)

    @adapter_routes.put("/{name}/versions/{number}/tags", summary="Set tags on a version")
    def set_tags(scope: Acting, name: str, number: int, body: TagsBody) -> dict[str, Any]:
        store = VersionTags(scope.registry)
        tags = store.set_tags(scope.tenant_id, name, number, body.tags, scope.actor)
        return tags_json(name, number, tags)

    @adapter_routes.delete(
        "/{name}/versions/{number}/tags/{key}", status_code=204, summary="Delete a version's tag"
    )
    def delete_tag(scope: Acting, name: str, number: int, key: str) -> None:
        VersionTags(scope.registry).delete_tag(scope.tenant_id, name, number, key, scope.actor)


def search_listing(
    scope: ActingScope, tags: list[str], aliases: list[str], version_json: VersionJson
) -> dict[str, Any]:
    """The tenant's versions with every tag filter (``k=v`` or ``k``) and alias given."""
    filters = [parse_tag_filter(t) for t in tags]
    matches = VersionTags(scope.registry).search(scope.tenant_id, filters, aliases)
    return _listing(
        [
            {**version_json(m.version), "adapter": m.adapter, "tags": m.tags, "aliases": m.aliases}
            for m in matches
        ]
    )
