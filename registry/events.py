"""The lifecycle event log: the audit log's public face, read with a cursor.

Events are not a table of their own: every lifecycle change already writes an audit
event in its own transaction (``registry.audit``), so an event can never be lost or
half-written. ``TYPES`` maps the audit actions that are public events to their event
types; other audit rows (keys, limits, evals...) stay internal. An event's id is its
audit row's id, so ``after=<id>`` is the cursor: ids only grow.

A tenant sees its own events and the platform's (``base.*``, which have no tenant);
never another tenant's: a foreign event answers exactly like an unknown one.

Ids are given out when a transaction inserts its row, and transactions commit in any
order, so an event with a smaller id can appear just after a reader passed it. Readers
that must see everything (the webhook fan-out) re-read a short window behind their
cursor (``SETTLE``) and rely on idempotent inserts.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, or_, select

from registry.errors import InvalidRequest, NotFound
from registry.models import AuditEvent, Tenant
from registry.registry import Registry
from registry.store import Store

UPGRADE_ITEM_EVENTS = (
    "evaluating", "action_required", "chosen", "retraining", "retrained", "promoted",
    "retired", "kept", "failed", "cancelled",
)  # fmt: skip
"""``adapter.upgrade.<this>``: what happens to one adapter in a base upgrade
(``registry.upgrades``), in its owner's log."""
TYPES: dict[str, str] = {
    "adapter.push": "adapter.version.created",
    "adapter.promote": "adapter.promoted",
    "adapter.canary": "adapter.canary.set",
    "adapter.canary_clear": "adapter.canary.cleared",
    "adapter.rollback": "adapter.rolled_back",
    "adapter.archive": "adapter.version.archived",
    "adapter.retire": "adapter.version.retired",
    "adapter.shadow": "adapter.shadow.set",
    "adapter.shadow_clear": "adapter.shadow.cleared",
    "adapter.alias_set": "adapter.alias.set",
    "adapter.alias_delete": "adapter.alias.deleted",
    "adapter.gates": "adapter.gates.updated",
    "adapter.gate_failed": "adapter.gate.failed",
    "adapter.drift": "adapter.drift.detected",
    "adapter.drift_cleared": "adapter.drift.cleared",
    "base.register": "base.registered",
    "base.deprecate": "base.deprecated",
    "routed_model.save": "routed_model.version.created",
    "routed_model.promote": "routed_model.promoted",
    "routed_model.rollback": "routed_model.rolled_back",
    "routed_model.delete": "routed_model.deleted",
    "routed_model.gates": "routed_model.gates.updated",
    "routed_model.gate_failed": "routed_model.gate.failed",
    "fine_tuning.job.succeeded": "fine_tuning.job.succeeded",
    "fine_tuning.job.failed": "fine_tuning.job.failed",
    "fine_tuning.job.cancelled": "fine_tuning.job.cancelled",
    "base.upgrade.start": "base.upgrade.started",
    "base.upgrade.done": "base.upgrade.completed",
    "base.upgrade.cancel": "base.upgrade.cancelled",
    **{f"adapter.upgrade.{name}": f"adapter.upgrade.{name}" for name in UPGRADE_ITEM_EVENTS},
}
"""Audit action -> public event type (README "Events and webhooks" lists them)."""
_ALIAS_OF = {
    "adapter.promote": "production",
    "adapter.rollback": "production",
    "adapter.canary": "canary",
    "adapter.shadow": "shadow",
}
"""The alias an alias-moving action points at a version."""
ACTIONS = {event_type: action for action, event_type in TYPES.items()}
EVENT_TYPES = tuple(sorted(ACTIONS))
MAX_LIMIT = 1000
SETTLE = dt.timedelta(seconds=30)
"""How long an event may take to commit after its id was given out, at most."""
_SUBJECT = re.compile(
    r"^(?P<kind>adapter|base|routed_model):(?:(?P<owner>[^/]+)/)?(?P<name>[^@]+)(?:@(?P<at>.+))?$"
)


@dataclass(frozen=True)
class Event:
    """One public event, as ``/v1/events`` and webhooks show it."""

    id: int
    type: str
    created_at: dt.datetime
    tenant: str | None
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        created = self.created_at
        if created.tzinfo is None:  # SQLite hands timestamps back naive; they are UTC
            created = created.replace(tzinfo=dt.UTC)
        return {
            "object": "event",
            "id": self.id,
            "type": self.type,
            "created_at": int(created.timestamp()),
            "tenant": self.tenant,
            "data": self.data,
        }


def event_data(row: AuditEvent) -> dict[str, Any]:
    """What an event says: what it is about (parsed from the audit subject), who did it,
    and the audit row's before and after."""
    data: dict[str, Any] = {"subject": row.subject, "actor": row.actor}
    found = _SUBJECT.match(row.subject)
    if found is not None:
        kind, name, at = found["kind"], found["name"], found["at"]
        if kind in ("adapter", "routed_model"):
            data[kind] = name
            if at is not None and at.isdigit():
                data["version"] = int(at)  # a version's own event (an upload, a save)
        else:
            data["base"] = name if at is None else f"{name}@{at}"
    elif row.subject.startswith("job:"):
        data["job"] = row.subject.removeprefix("job:")
    version = _version(row)
    if version is not None and "version" not in data:
        data["version"] = version
    data["before"], data["after"] = row.before, row.after
    return data


def _version(row: AuditEvent) -> int | None:
    """The adapter version an event is about, when the audit row says."""
    after = row.after or {}
    if isinstance(after.get("version"), int):  # a retirement, an archive, a drift alert
        return int(after["version"])
    alias = _ALIAS_OF.get(row.action)  # an alias move: the version it points at now
    moved = (after.get("aliases") or {}).get(alias) if alias else None
    return int(moved["version"]) if isinstance(moved, dict) and "version" in moved else None


def public(types: list[str] | None) -> list[str]:
    """The audit actions of ``types`` (all public ones when None); unknown types refused."""
    if types is None:
        return list(TYPES)
    unknown = sorted(set(types) - set(ACTIONS))
    if unknown:
        raise InvalidRequest(
            f"unknown event type(s) {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}"
        )
    return [ACTIONS[t] for t in types]


class EventLog(Store):
    """Reads of the event log, tenant-scoped or all (admin)."""

    def __init__(self, registry: Registry) -> None:
        self.database, self.blobs, self.limits = registry.database, registry.blobs, registry.limits

    def read(
        self,
        tenant_id: int | None,
        after: int = 0,
        limit: int = 100,
        types: list[str] | None = None,
    ) -> list[Event]:
        """Events with an id above ``after``, oldest first: ``tenant_id``'s own and the
        platform's, or (None) every tenant's."""
        with self._read() as s:
            return self.read_in(s, tenant_id, after, max(1, min(limit, MAX_LIMIT)), types)

    def read_in(
        self, s: Session, tenant_id: int | None, after: int, limit: int, types: list[str] | None
    ) -> list[Event]:
        query = select(AuditEvent).where(
            col(AuditEvent.id) > after, col(AuditEvent.action).in_(public(types))
        )
        if tenant_id is not None:
            mine = col(AuditEvent.tenant_id) == tenant_id
            query = query.where(or_(mine, col(AuditEvent.tenant_id).is_(None)))
        rows = s.exec(query.order_by(col(AuditEvent.id)).limit(limit)).all()
        return self.render(s, list(rows))

    def get(self, tenant_id: int | None, event_id: int) -> Event:
        """One event; ``NotFound`` for an unknown, internal or foreign one alike."""
        with self._read() as s:
            row = s.get(AuditEvent, event_id)
            visible = row is not None and row.action in TYPES
            if visible and tenant_id is not None and row is not None:
                visible = row.tenant_id in (None, tenant_id)
            if not visible or row is None:
                raise NotFound(f"event {event_id} does not exist")
            return self.render(s, [row])[0]

    def latest_id(self) -> int:
        """The newest audit id (0 when there is none): where a new reader starts."""
        with self._read() as s:
            newest = s.exec(select(AuditEvent.id).order_by(col(AuditEvent.id).desc())).first()
            return newest or 0

    def render(self, s: Session, rows: list[AuditEvent]) -> list[Event]:
        ids = {r.tenant_id for r in rows if r.tenant_id is not None}
        names: dict[int | None, str] = {}
        if ids:
            tenants = s.exec(select(Tenant).where(col(Tenant.id).in_(ids))).all()
            names = {t.id: t.name for t in tenants}
        return [
            Event(
                id=r.id or 0,
                type=TYPES[r.action],
                created_at=r.created_at,
                tenant=names.get(r.tenant_id),
                data=event_data(r),
            )
            for r in rows
        ]
