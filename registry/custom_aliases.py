"""Custom aliases: names beyond ``production``, ``canary`` and ``shadow`` (``staging``,
``eu-prod``...) that point at one version of an adapter, served as ``adapter:alias``.

They live in the same ``aliases`` table as the built-in ones, so everything that already
reads aliases sees them: the routing view (a request for ``bot:staging`` resolves it,
bypassing the canary split), archive and retire (refused while an alias points at a
version). A move or a delete is recorded like the built-in ones: an ``alias_history`` row
and an audit event (``adapter.alias_set`` / ``adapter.alias_delete``, public as the events
``adapter.alias.set`` / ``adapter.alias.deleted``), in the transaction that makes it,
under the adapter's row lock.

The built-in names are refused here: each has its own operation with its own rules
(gates for production, a weight for canary, a share and a base check for shadow).
Everything is tenant-scoped: a foreign adapter answers exactly like an unknown one.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session, col, select

from registry import lifecycle
from registry.errors import Conflict, InvalidRequest, NotFound
from registry.models import CANARY, PRODUCTION, SHADOW, AdapterVersion, Alias, AliasHistory
from registry.registry import Registry
from registry.values import Actor

MAX_LENGTH = 64
"""Characters in an alias name at most (the ``aliases.name`` column)."""
MAX_CUSTOM_ALIASES = 32
"""Custom aliases one adapter may have at once."""
SET_ACTION = "adapter.alias_set"
DELETE_ACTION = "adapter.alias_delete"
BUILT_IN: dict[str, str] = {
    PRODUCTION: "promote a version (`loraplex adapters promote`, POST /{name}/promote) "
    "or roll back",
    CANARY: "set or clear it with `loraplex adapters canary` (POST or DELETE /{name}/canary)",
    SHADOW: "set or clear it with `loraplex adapters shadow` (POST or DELETE /{name}/shadow)",
}
"""The built-in aliases and how to move each instead."""

# The router's alias form (router.names._NAME), spelt out: the registry imports nothing of
# the router; tests/registry/test_custom_aliases.py checks that the two agree.
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_LENGTH - 1}}}")


def check_alias_name(alias: str) -> None:
    """Raise ``InvalidRequest`` unless ``alias`` may name a custom alias."""
    builtin = alias.lower()
    if builtin in BUILT_IN:
        # Any case: `bot:Production` beside `bot:production` would only confuse.
        raise InvalidRequest(
            f"alias {alias!r} is a built-in alias with its own rules; {BUILT_IN[builtin]}"
        )
    if _NAME.fullmatch(alias) is None:
        raise InvalidRequest(
            f"alias name {alias!r} is not valid: use 1-{MAX_LENGTH} ASCII letters, digits, "
            "'.', '_' or '-', starting with a letter or digit (requests name it as "
            "'adapter:alias')"
        )


@dataclass(frozen=True)
class AliasMove:
    """One entry of an alias's history."""

    action: str
    """``adapter.alias_set`` or ``adapter.alias_delete`` (built-in ones: their actions)."""
    version: int | None
    """The version it points at after the move (None: deleted)."""
    previous_version: int | None
    """The version it pointed at before (None: it was new)."""
    actor: str
    created_at: dt.datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "version": self.version,
            "previous_version": self.previous_version,
            "actor": self.actor,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class AliasInfo:
    """An alias of an adapter: where it points, and (when asked) how it got there."""

    alias: str
    version: int
    weight: float
    updated_at: dt.datetime
    history: list[AliasMove] = field(default_factory=list)
    """Oldest first; filled only for one alias's own view."""

    @property
    def built_in(self) -> bool:
        return self.alias in BUILT_IN

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "object": "adapter.alias",
            "alias": self.alias,
            "version": self.version,
            "weight": self.weight,
            "built_in": self.built_in,
            "updated_at": self.updated_at.isoformat(),
        }
        if self.history:
            body["history"] = [m.to_json() for m in self.history]
        return body


class CustomAliases:
    """Set, delete and list an adapter's aliases, through the registry's locked writes."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def set_alias(
        self, tenant_id: int, name: str, alias: str, number: int, actor: Actor
    ) -> AliasInfo:
        """Point custom alias ``alias`` at active version ``number`` (creating it)."""
        check_alias_name(alias)
        with self.registry._locked(tenant_id, name, actor) as (s, adapter, change):
            assert adapter.id is not None
            version = self.registry._version(s, adapter, number)
            lifecycle._require_active(version, "aliased")
            current = lifecycle.aliases(s, adapter.id)
            custom = [a for a in current if a not in BUILT_IN]
            if alias not in current and len(custom) >= MAX_CUSTOM_ALIASES:
                raise Conflict(
                    f"adapter {name!r} already has {MAX_CUSTOM_ALIASES} custom aliases, the "
                    "most it may have; delete one it no longer needs first"
                )
            extra: dict[str, object] = {"alias": alias, "version": number}
            row = lifecycle.move_alias(s, adapter, alias, version, 1.0, change, SET_ACTION, extra)
            return AliasInfo(alias, number, row.weight, row.updated_at)

    def delete_alias(self, tenant_id: int, name: str, alias: str, actor: Actor) -> None:
        """Remove custom alias ``alias``; ``NotFound`` when the adapter has none so named."""
        check_alias_name(alias)
        with self.registry._locked(tenant_id, name, actor) as (s, adapter, change):
            assert adapter.id is not None
            current = lifecycle.aliases(s, adapter.id).get(alias)
            if current is None:
                raise _no_alias(name, alias)
            previous = s.get(AdapterVersion, current.version_id)
            extra: dict[str, object] = {
                "alias": alias,
                "previous_version": previous.number if previous else None,
            }
            lifecycle._clear(s, adapter, alias, change, DELETE_ACTION, extra)

    def list_aliases(self, tenant_id: int, name: str) -> list[AliasInfo]:
        """Every alias of the adapter, built-in ones included, by name."""
        with self.registry._read() as s:
            adapter = self.registry._own_adapter(s, tenant_id, name)
            rows = s.exec(
                select(Alias, AdapterVersion)
                .join(AdapterVersion, col(AdapterVersion.id) == Alias.version_id)
                .where(Alias.adapter_id == adapter.id)
                .order_by(col(Alias.name))
            ).all()
        return [AliasInfo(a.name, v.number, a.weight, a.updated_at) for a, v in rows]

    def get_alias(self, tenant_id: int, name: str, alias: str) -> AliasInfo:
        """One alias (any, built-in ones included) with its history, oldest first."""
        with self.registry._read() as s:
            adapter = self.registry._own_adapter(s, tenant_id, name)
            row = lifecycle.aliases(s, adapter.id or 0).get(alias)
            if row is None:
                raise _no_alias(name, alias)
            target = s.get(AdapterVersion, row.version_id)
            assert target is not None  # versions are never deleted
            history = _history(s, adapter.id or 0, alias)
        return AliasInfo(alias, target.number, row.weight, row.updated_at, history)


def _no_alias(name: str, alias: str) -> NotFound:
    return NotFound(f"adapter {name!r} has no alias {alias!r}; list its aliases")


def _history(s: Session, adapter_id: int, alias: str) -> list[AliasMove]:
    rows = s.exec(
        select(AliasHistory)
        .where(AliasHistory.adapter_id == adapter_id, AliasHistory.alias == alias)
        .order_by(col(AliasHistory.id))
    ).all()
    numbers = {
        v.id: v.number
        for v in s.exec(select(AdapterVersion).where(AdapterVersion.adapter_id == adapter_id))
    }
    return [
        AliasMove(
            r.action,
            numbers.get(r.version_id) if r.version_id else None,
            numbers.get(r.previous_version_id) if r.previous_version_id else None,
            r.actor,
            r.created_at,
        )
        for r in rows
    ]
