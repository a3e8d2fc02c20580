"""Webhook subscriptions and their deliveries: the tables and the delivery queue.

A tenant subscribes a URL to event types (``registry.events``); its signing secret
(``whsec_`` + base64 of 24 random bytes) is stored as given, since signing needs it
back, and shown once, at creation or rotation. A rotation keeps the old secret signing
beside the new one until its grace period ends, then drops it.

Deliveries come from the event log: ``fan_out`` turns the events after a subscription's
cursor into one ``pending`` delivery each (unique per subscription and event, so two
gateways fanning out at once insert each delivery once). It re-reads ``SETTLE`` behind
the cursor, since an event may commit after a bigger id did. Gateways ``claim`` due
deliveries with a lease, by a conditional ``UPDATE`` (as ``JobStore.claim`` does), so
no two send the same attempt; each claim counts an attempt. ``finish`` records the
outcome while the lease is still the claimer's: ``delivered``, or back to ``pending``
after a backoff that doubles per attempt up to a cap, or ``dead`` after the last
attempt; ``redeliver`` makes a dead one pending again. A delivery's id is the message
id receivers see (``webhook-id``), the same across its attempts.

Everything is tenant-scoped: a foreign subscription answers exactly like an unknown one.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, UniqueConstraint, func, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Field, Session, SQLModel, col, select

from registry.errors import Conflict, InvalidRequest, NotFound
from registry.events import SETTLE, Event, EventLog, public
from registry.models import AuditEvent, timestamp_column, utcnow
from registry.registry import Registry
from registry.store import Store

PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"
STATES = (PENDING, DELIVERED, DEAD)
SECRET_PREFIX = "whsec_"
MAX_URL_LENGTH = 2048
DEFAULT_MAX_PER_TENANT = 20
DEFAULT_GRACE = dt.timedelta(hours=24)
FAN_OUT_BATCH = 500


class WebhookSubscription(SQLModel, table=True):
    __tablename__ = "webhook_subscriptions"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: int = Field(foreign_key="tenants.id", index=True)
    url: str = Field(max_length=MAX_URL_LENGTH)
    event_types: list[str] = Field(default_factory=list, sa_type=JSON)
    """Public event types; empty: every type."""
    description: str = Field(default="", max_length=256)
    secret: str = Field(max_length=128)
    """The signing secret, stored as given (signing needs it back)."""
    previous_secret: str | None = Field(default=None, max_length=128)
    """The secret before the last rotation, signing beside the new one until it expires."""
    previous_expires_at: dt.datetime | None = timestamp_column(nullable=True)
    cursor: int = 0
    """The id of the last event fanned out, less what may still commit (``SETTLE``)."""
    created_at: dt.datetime = timestamp_column()


class WebhookDelivery(SQLModel, table=True):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (UniqueConstraint("subscription_id", "event_id"),)

    id: str = Field(primary_key=True, max_length=40)
    subscription_id: str = Field(foreign_key="webhook_subscriptions.id", index=True, max_length=40)
    event_id: int = Field(foreign_key="audit_events.id")
    state: str = Field(default=PENDING, max_length=16, index=True)
    attempts: int = 0
    next_attempt_at: dt.datetime = timestamp_column(index=True)
    lease_owner: str | None = Field(default=None, max_length=128)
    lease_expires_at: dt.datetime | None = timestamp_column(nullable=True)
    last_status: int | None = None
    """The HTTP status of the last attempt; None when it got no answer."""
    last_error: str | None = Field(default=None, max_length=512)
    created_at: dt.datetime = timestamp_column()
    delivered_at: dt.datetime | None = timestamp_column(nullable=True)


@dataclass(frozen=True)
class Backoff:
    """Retry schedule: ``first`` seconds after attempt 1, doubling, at most ``cap``; dead
    after ``max_attempts`` attempts."""

    first: float = 1.0
    cap: float = 300.0
    max_attempts: int = 8

    def delay(self, attempts: int) -> dt.timedelta:
        return dt.timedelta(seconds=min(self.cap, self.first * 2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class Claimed:
    """A delivery claimed for one attempt: where to send what, signed with which secrets."""

    delivery_id: str
    attempt: int
    url: str
    secrets: list[str]
    event: Event
    tenant_id: int


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)  # SQLite hands timestamps back naive; they are UTC


def _settled_cursor(cursor: int, events: list[Event], now: dt.datetime) -> int:
    """The cursor after ``events``: past those surely committed (older than ``SETTLE``),
    so the rest are read again; past a whole batch regardless (a backlog must move on)."""
    for event in events:
        if (_aware(event.created_at) or now) >= now - SETTLE:
            break
        cursor = event.id
    if len(events) == FAN_OUT_BATCH:
        cursor = max(cursor, events[-1].id)
    return cursor


def signing_secrets(sub: WebhookSubscription, now: dt.datetime | None = None) -> list[str]:
    """The secrets that sign now: the current one, and the previous one in its grace."""
    expires = _aware(sub.previous_expires_at)
    if sub.previous_secret and expires is not None and expires > (now or utcnow()):
        return [sub.secret, sub.previous_secret]
    return [sub.secret]


def _not_found(subscription_id: str) -> NotFound:
    return NotFound(f"webhook {subscription_id!r} does not exist")


class WebhookStore(Store):
    """Subscriptions (tenant-scoped) and the delivery queue gateways work off."""

    def __init__(self, registry: Registry, max_per_tenant: int = DEFAULT_MAX_PER_TENANT) -> None:
        self.database, self.blobs, self.limits = registry.database, registry.blobs, registry.limits
        self.events = EventLog(registry)
        self.max_per_tenant = max_per_tenant

    # -- subscriptions --------------------------------------------------------------

    def create(
        self, tenant_id: int, url: str, event_types: list[str], description: str = ""
    ) -> WebhookSubscription:
        """A new subscription, starting after the newest event (none before it is sent)."""
        if len(url) > MAX_URL_LENGTH:
            raise InvalidRequest(f"webhook URL is {len(url)} characters; at most {MAX_URL_LENGTH}")
        public(event_types or None)  # refuses unknown types
        with self._write() as s:
            self._tenant(s, tenant_id, lock=True)  # one creator at a time counts
            count = len(s.exec(select(WebhookSubscription.id).where(
                WebhookSubscription.tenant_id == tenant_id)).all())  # fmt: skip
            if count >= self.max_per_tenant:
                raise Conflict(
                    f"tenant has {count} webhooks, the most allowed "
                    f"(LORAPLEX_WEBHOOK_MAX_PER_TENANT); delete one first"
                )
            newest = s.exec(select(AuditEvent.id).order_by(col(AuditEvent.id).desc())).first()
            sub = WebhookSubscription(
                id=f"wh_{uuid.uuid4().hex[:24]}",
                tenant_id=tenant_id,
                url=url,
                event_types=sorted(set(event_types)),
                description=description[:256],
                secret=new_secret(),
                cursor=newest or 0,
            )
            s.add(sub)
        return sub

    def get(self, tenant_id: int, subscription_id: str) -> WebhookSubscription:
        with self._read() as s:
            return self._own(s, tenant_id, subscription_id)

    def _own(
        self, s: Session, tenant_id: int, subscription_id: str, lock: bool = False
    ) -> WebhookSubscription:
        sub = s.get(WebhookSubscription, subscription_id, with_for_update=lock)
        if sub is None or sub.tenant_id != tenant_id:
            raise _not_found(subscription_id)
        return sub

    def subscriptions(self, tenant_id: int) -> list[WebhookSubscription]:
        with self._read() as s:
            query = select(WebhookSubscription).where(WebhookSubscription.tenant_id == tenant_id)
            return list(s.exec(query.order_by(col(WebhookSubscription.created_at))).all())

    def delete(self, tenant_id: int, subscription_id: str) -> None:
        """Remove a subscription and its delivery log (pending deliveries are not sent)."""
        with self._write() as s:
            sub = self._own(s, tenant_id, subscription_id, lock=True)
            s.execute(
                text("DELETE FROM webhook_deliveries WHERE subscription_id = :id"), {"id": sub.id}
            )
            s.delete(sub)

    def rotate(
        self, tenant_id: int, subscription_id: str, grace: dt.timedelta = DEFAULT_GRACE
    ) -> WebhookSubscription:
        """A new secret; the current one keeps signing beside it for ``grace``."""
        if grace < dt.timedelta(0) or grace > dt.timedelta(days=7):
            raise InvalidRequest("grace period must be 0 to 7 days")
        with self._write() as s:
            sub = self._own(s, tenant_id, subscription_id, lock=True)
            sub.previous_secret, sub.secret = sub.secret, new_secret()
            sub.previous_expires_at = utcnow() + grace
            s.add(sub)
        return sub

    # -- the delivery log -----------------------------------------------------------

    def deliveries(
        self, tenant_id: int, subscription_id: str, state: str | None = None, limit: int = 100
    ) -> list[WebhookDelivery]:
        """A subscription's deliveries, newest first."""
        if state is not None and state not in STATES:
            raise InvalidRequest(f"unknown delivery state {state!r}; one of {', '.join(STATES)}")
        with self._read() as s:
            self._own(s, tenant_id, subscription_id)
            query = select(WebhookDelivery).where(
                WebhookDelivery.subscription_id == subscription_id
            )
            if state is not None:
                query = query.where(WebhookDelivery.state == state)
            query = query.order_by(col(WebhookDelivery.event_id).desc()).limit(min(limit, 1000))
            return list(s.exec(query).all())

    def redeliver(self, tenant_id: int, subscription_id: str, delivery_id: str) -> WebhookDelivery:
        """Make a dead delivery pending again, due now, with a fresh count of attempts."""
        with self._write() as s:
            self._own(s, tenant_id, subscription_id)
            row = s.get(WebhookDelivery, delivery_id, with_for_update=True)
            if row is None or row.subscription_id != subscription_id:
                raise NotFound(f"delivery {delivery_id!r} does not exist")
            if row.state != DEAD:
                raise Conflict(f"delivery {delivery_id} is {row.state}; only dead ones redeliver")
            row.state, row.attempts, row.next_attempt_at = PENDING, 0, utcnow()
            row.lease_owner = row.lease_expires_at = None
            s.add(row)
        return row

    # -- the queue ------------------------------------------------------------------

    def fan_out(self) -> int:
        """Queue a delivery per new event and subscription; the number queued."""
        if not self._events_to_fan_out():
            return 0  # no write transaction (SQLite has one writer) while there is nothing
        return self._retrying(self._fan_out_once)

    def _events_to_fan_out(self) -> bool:
        with self._read() as s:
            lowest = s.exec(select(func.min(WebhookSubscription.cursor))).first()
            if lowest is None:
                return False  # no subscription
            newer = select(AuditEvent.id).where(col(AuditEvent.id) > lowest).limit(1)
            expired = select(WebhookSubscription.id).where(
                col(WebhookSubscription.previous_expires_at) <= utcnow()
            )  # a rotated-out secret whose grace is over, to drop
            return s.exec(newer).first() is not None or s.exec(expired.limit(1)).first() is not None

    def _fan_out_once(self) -> int:
        now, queued = utcnow(), 0
        with self._write() as s:
            query = select(WebhookSubscription).order_by(col(WebhookSubscription.id))
            if self.database.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            for sub in s.exec(query).all():
                queued += self._fan_out_to(s, sub, now)
        return queued

    def _fan_out_to(self, s: Session, sub: WebhookSubscription, now: dt.datetime) -> int:
        types = sub.event_types or None
        events = self.events.read_in(s, sub.tenant_id, sub.cursor, FAN_OUT_BATCH, types)
        query = select(WebhookDelivery.event_id).where(
            WebhookDelivery.subscription_id == sub.id, col(WebhookDelivery.event_id) > sub.cursor
        )
        known = set(s.exec(query))
        fresh = [e.id for e in events if e.id not in known]
        for event_id in fresh:
            self._queue(s, sub.id, event_id, now)
        sub.cursor = _settled_cursor(sub.cursor, events, now)
        expires = _aware(sub.previous_expires_at)
        if sub.previous_secret and (expires is None or expires <= now):
            sub.previous_secret = sub.previous_expires_at = None  # its grace is over: dropped
        s.add(sub)
        return len(fresh)

    def _queue(self, s: Session, subscription_id: str, event_id: int, now: dt.datetime) -> None:
        """Insert one pending delivery, unless a concurrent fan-out just did."""
        insert = pg_insert if self.database.dialect.name == "postgresql" else sqlite_insert
        stmt = insert(WebhookDelivery).values(
            id=f"msg_{uuid.uuid4().hex[:24]}", subscription_id=subscription_id,
            event_id=event_id, state=PENDING, attempts=0, next_attempt_at=now, created_at=now,
        )  # fmt: skip
        s.execute(stmt.on_conflict_do_nothing(index_elements=["subscription_id", "event_id"]))

    def claim(self, owner: str, lease: dt.timedelta, limit: int = 16) -> list[Claimed]:
        """Take up to ``limit`` due deliveries for one attempt each, leased to ``owner``."""
        now = utcnow()
        claimed: list[Claimed] = []
        with self._read() as s:
            if not self._due(s, now, 1, lock=False):
                return claimed  # nothing due: no write transaction
        with self._write() as s:
            for row in self._due(s, now, limit):
                taken = s.execute(
                    text(
                        "UPDATE webhook_deliveries SET lease_owner = :owner, "
                        "lease_expires_at = :until, attempts = attempts + 1 "
                        "WHERE id = :id AND state = :pending AND next_attempt_at <= :now "
                        "AND (lease_expires_at IS NULL OR lease_expires_at <= :now)"
                    ),
                    {"owner": owner, "until": now + lease, "id": row.id, "pending": PENDING,
                     "now": now},
                )  # fmt: skip
                if taken.rowcount != 1:  # type: ignore[attr-defined]
                    continue
                claimed.append(self._claimed(s, row, now))
        return claimed

    def _due(
        self, s: Session, now: dt.datetime, limit: int, lock: bool = True
    ) -> list[WebhookDelivery]:
        lease = col(WebhookDelivery.lease_expires_at)
        query = (
            select(WebhookDelivery)
            .where(WebhookDelivery.state == PENDING, col(WebhookDelivery.next_attempt_at) <= now)
            .where(lease.is_(None) | (lease <= now))
            .order_by(col(WebhookDelivery.next_attempt_at))
            .limit(limit)
        )
        if lock and self.database.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        # SQLite: a write transaction began IMMEDIATE, so no other writer runs until commit.
        return list(s.exec(query).all())

    def _claimed(self, s: Session, row: WebhookDelivery, now: dt.datetime) -> Claimed:
        sub = s.get(WebhookSubscription, row.subscription_id)
        assert sub is not None  # deleting a subscription deletes its deliveries
        event = self.events.render(s, [s.get(AuditEvent, row.event_id)])[0]  # type: ignore[list-item]
        return Claimed(row.id, row.attempts + 1, sub.url, signing_secrets(sub, now), event,
                       sub.tenant_id)  # fmt: skip

    def finish(
        self,
        delivery_id: str,
        owner: str,
        backoff: Backoff,
        status: int | None = None,
        error: str | None = None,
    ) -> str | None:
        """Record an attempt's outcome (2xx: delivered); the new state, or None when the
        lease was no longer ``owner``'s (another gateway may be sending it now)."""
        with self._write() as s:
            row = s.get(WebhookDelivery, delivery_id, with_for_update=True)
            if row is None or row.lease_owner != owner or row.state != PENDING:
                return None
            now = utcnow()
            row.last_status, row.last_error = status, error[:512] if error else None
            row.lease_owner = row.lease_expires_at = None
            if status is not None and 200 <= status < 300:
                row.state, row.delivered_at, row.last_error = DELIVERED, now, None
            elif row.attempts >= backoff.max_attempts:
                row.state = DEAD
            else:
                row.next_attempt_at = now + backoff.delay(row.attempts)
            s.add(row)
            return row.state


def delivery_json(row: WebhookDelivery) -> dict[str, Any]:
    """A delivery as the REST API and the CLI show it."""

    def unix(value: dt.datetime | None) -> int | None:
        value = _aware(value)
        return int(value.timestamp()) if value is not None else None

    return {
        "object": "webhook.delivery",
        "id": row.id,
        "event_id": row.event_id,
        "state": row.state,
        "attempts": row.attempts,
        "last_status": row.last_status,
        "last_error": row.last_error,
        "next_attempt_at": unix(row.next_attempt_at) if row.state == PENDING else None,
        "delivered_at": unix(row.delivered_at),
        "created_at": unix(row.created_at),
    }
