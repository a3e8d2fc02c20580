"""Audit events, written in the same transaction as the change they describe."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from registry.models import AuditEvent


def record(
    session: Session,
    actor: str,
    action: str,
    subject: str,
    *,
    tenant_id: int | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> AuditEvent:
    event = AuditEvent(
        actor=actor, action=action, subject=subject, tenant_id=tenant_id, before=before, after=after
    )
    session.add(event)
    return event
