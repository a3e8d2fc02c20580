"""Alias moves and version state changes. Callers hold the adapter's row lock.

Each function changes rows and writes its audit event in the caller's
transaction, so a change and its record commit together or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session, col, select

from registry import audit
from registry.errors import Conflict, InvalidRequest
from registry.models import (
    ACTIVE,
    ARCHIVED,
    CANARY,
    PRODUCTION,
    RETIRED,
    SHADOW,
    Adapter,
    AdapterVersion,
    Alias,
    AliasHistory,
    utcnow,
)

STATE_ACTIONS = {ARCHIVED: "adapter.archive", RETIRED: "adapter.retire"}


@dataclass(frozen=True)
class Change:
    """Who does it and how the audit log names it."""

    actor: str
    subject: str
    tenant_id: int


def aliases(session: Session, adapter_id: int) -> dict[str, Alias]:
    rows = session.exec(select(Alias).where(Alias.adapter_id == adapter_id)).all()
    return {row.name: row for row in rows}


def _require_active(version: AdapterVersion, what: str) -> None:
    if version.state != ACTIVE:
        raise Conflict(
            f"version {version.number} is {version.state}; only active versions can be {what}"
        )


def _snapshot(session: Session, adapter_id: int) -> dict[str, object]:
    numbers = {
        v.id: v.number
        for v in session.exec(select(AdapterVersion).where(AdapterVersion.adapter_id == adapter_id))
    }
    return {
        name: {"version": numbers[a.version_id], "weight": a.weight}
        for name, a in sorted(aliases(session, adapter_id).items())
    }


def move_alias(
    session: Session,
    adapter: Adapter,
    name: str,
    version: AdapterVersion,
    weight: float,
    change: Change,
    action: str,
    extra: dict[str, object] | None = None,
) -> Alias:
    """Point alias ``name`` at ``version``; record history and audit."""
    assert adapter.id is not None and version.id is not None
    before = _snapshot(session, adapter.id)
    current = aliases(session, adapter.id).get(name)
    previous_id = current.version_id if current else None
    if current is None:
        current = Alias(adapter_id=adapter.id, name=name, version_id=version.id)
    current.version_id, current.weight, current.updated_at = version.id, weight, utcnow()
    session.add(current)
    session.add(
        AliasHistory(
            adapter_id=adapter.id,
            alias=name,
            action=action,
            version_id=version.id,
            previous_version_id=previous_id,
            actor=change.actor,
        )
    )
    session.flush()
    after: dict[str, object] = {"aliases": _snapshot(session, adapter.id), **(extra or {})}
    audit.record(
        session,
        change.actor,
        action,
        change.subject,
        tenant_id=change.tenant_id,
        before={"aliases": before},
        after=after,
    )
    return current


def promote(
    session: Session,
    adapter: Adapter,
    version: AdapterVersion,
    change: Change,
    extra: dict[str, object] | None = None,
) -> Alias:
    _require_active(version, "promoted")
    return move_alias(session, adapter, PRODUCTION, version, 1.0, change, "adapter.promote", extra)


def canary(
    session: Session, adapter: Adapter, version: AdapterVersion, weight: float, change: Change
) -> Alias:
    if not 0.0 <= weight <= 1.0:
        raise InvalidRequest(f"canary weight {weight} is outside 0..1; pass a share like 0.1")
    _require_active(version, "canaried")
    return move_alias(session, adapter, CANARY, version, weight, change, "adapter.canary")


def clear_canary(session: Session, adapter: Adapter, change: Change) -> None:
    _clear(session, adapter, CANARY, change, "adapter.canary_clear")


def shadow(
    session: Session, adapter: Adapter, version: AdapterVersion, share: float, change: Change
) -> Alias:
    """Copy ``share`` of production's requests to ``version``: a version of the same
    adapter and base as production, active, and not production itself."""
    assert adapter.id is not None
    if not 0.0 < share <= 1.0:
        raise InvalidRequest(
            f"shadow share {share} is outside (0, 1]; pass the share of production "
            "requests to copy, like 0.2"
        )
    _require_active(version, "shadowed")
    current = aliases(session, adapter.id).get(PRODUCTION)
    production = session.get(AdapterVersion, current.version_id) if current else None
    if production is None:
        raise Conflict("the adapter has no production version to shadow; promote one first")
    if production.id == version.id:
        raise Conflict(
            f"version {version.number} is the production version; shadow another version"
        )
    if production.base_id != version.base_id:
        raise Conflict(
            f"version {version.number} is pinned to another base than production version "
            f"{production.number}; shadow copies run on production's base, so shadow a "
            "version trained on that base"
        )
    return move_alias(session, adapter, SHADOW, version, share, change, "adapter.shadow")


def clear_shadow(session: Session, adapter: Adapter, change: Change) -> None:
    _clear(session, adapter, SHADOW, change, "adapter.shadow_clear")


def _clear(
    session: Session,
    adapter: Adapter,
    name: str,
    change: Change,
    action: str,
    extra: dict[str, object] | None = None,
) -> None:
    assert adapter.id is not None
    current = aliases(session, adapter.id).get(name)
    if current is None:
        raise Conflict(f"the adapter has no {name} alias to clear")
    before = _snapshot(session, adapter.id)
    session.delete(current)
    session.add(
        AliasHistory(
            adapter_id=adapter.id,
            alias=name,
            action=action,
            previous_version_id=current.version_id,
            actor=change.actor,
        )
    )
    session.flush()
    audit.record(
        session,
        change.actor,
        action,
        change.subject,
        tenant_id=change.tenant_id,
        before={"aliases": before},
        after={"aliases": _snapshot(session, adapter.id), **(extra or {})},
    )


def rollback(session: Session, adapter: Adapter, change: Change) -> Alias:
    """Point production back at the version it had before the latest promote not yet undone."""
    assert adapter.id is not None
    entry = session.exec(
        select(AliasHistory)
        .where(AliasHistory.adapter_id == adapter.id, AliasHistory.alias == PRODUCTION)
        .where(AliasHistory.action == "adapter.promote", col(AliasHistory.undone).is_(False))
        .order_by(col(AliasHistory.id).desc())
    ).first()
    if entry is None or entry.previous_version_id is None:
        raise Conflict("there is no earlier production version to roll back to; promote one")
    target = session.get(AdapterVersion, entry.previous_version_id)
    assert target is not None
    _require_active(target, "rolled back to")
    entry.undone = True
    session.add(entry)
    return move_alias(session, adapter, PRODUCTION, target, 1.0, change, "adapter.rollback")


def set_state(
    session: Session, adapter: Adapter, version: AdapterVersion, state: str, change: Change
) -> None:
    """Archive or retire a version; refused while an alias points at it."""
    assert adapter.id is not None
    holding = sorted(
        a.name for a in aliases(session, adapter.id).values() if a.version_id == version.id
    )
    if holding:
        raise Conflict(
            f"version {version.number} is the target of alias(es) {', '.join(holding)}; "
            "promote or canary another version (or roll back), clear the shadow, or move "
            "or delete a custom alias (`loraplex adapters alias`), first"
        )
    if version.state == state:
        return
    if version.state == RETIRED:
        raise Conflict(f"version {version.number} is retired; retired versions stay retired")
    before = {"version": version.number, "state": version.state}
    version.state = state
    session.add(version)
    audit.record(
        session,
        change.actor,
        STATE_ACTIONS[state],
        change.subject,
        tenant_id=change.tenant_id,
        before=before,
        after={"version": version.number, "state": state},
    )
