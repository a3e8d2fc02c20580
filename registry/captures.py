"""Stored chat completions and the feedback clients give on them (the capture tables).

A tenant opts in (``CaptureSettings``: off unless an operator turns it on, a default for
requests that do not say ``store``, a retention period and a body size limit); the gateway
then hands each stored answer to ``CaptureStore.save`` after the client has it. A record
names what served it (adapter, version, route) and carries the request and the answer:
inline when small, else one blob per record (``captures/<tenant>/<random>``). Records are
keyed by (tenant, completion id), because the engine lets a client choose the id
(``request_id``): two tenants' ids may collide, and neither may ever learn of the other's.

Everything is tenant-scoped: a foreign completion id raises the same ``NotFound`` as an
unknown one. ``purge`` deletes records (and their feedback and blobs) past their tenant's
retention; running it twice, or from two gateways at once, is harmless.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from sqlalchemy import JSON, Column, DateTime, Text, UniqueConstraint, delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from registry import audit
from registry.blobs import fetch_bytes, put_bytes
from registry.errors import InvalidRequest, NotFound
from registry.models import utcnow
from registry.registry import Registry
from registry.store import Store
from registry.values import Actor

INLINE_BYTES = 16 << 10
"""Request and answer together up to this size (as JSON) stay in the row; larger go to a blob."""
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_RETENTION_DAYS = 3650
MAX_BODY_BYTES = 64 << 20
"""Highest ``max_body_bytes`` an operator may set."""
MAX_CORRECTION_CHARS = 64 << 10
MAX_NOTE_CHARS = 4096
RATINGS = range(1, 6)
THUMBS = ("up", "down")
PURGE_BATCH = 500
"""Records one purge transaction deletes; ``purge`` loops until none are left."""
_UNSAFE_KEY = re.compile(r'["\\\x00-\x1f]')
"""What a metadata key may not hold: SQLite's JSON paths (the list filter) cannot quote it."""

NUL = "\x00"
Order = Literal["asc", "desc"]


@dataclass(frozen=True)
class CaptureSettings:
    """A tenant's capture: whether it is on, and its defaults and bounds."""

    enabled: bool = False
    """Off (the default): nothing of the tenant's is stored, whatever its requests say."""
    store_by_default: bool = False
    """Stored when a request does not say ``store`` (OpenAI's default is not to)."""
    retention_days: int = 30
    """Records older than this are deleted."""
    max_body_bytes: int = 1 << 20
    """Largest request or answer (as the client sent or got it, stream events included)
    stored; a completion with a larger one is not stored (and counted as dropped)."""


class TenantCaptureSettings(SQLModel, table=True):
    __tablename__ = "capture_settings"

    tenant_id: int = Field(primary_key=True, foreign_key="tenants.id")
    enabled: bool = False
    store_by_default: bool = False
    retention_days: int = 30
    max_body_bytes: int = 1 << 20
    updated_at: dt.datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class StoredCompletion(SQLModel, table=True):
    __tablename__ = "stored_completions"
    __table_args__ = (UniqueConstraint("tenant_id", "completion_id"),)

    id: int | None = Field(default=None, primary_key=True)
    """Capture order: what lists sort and page by."""
    tenant_id: int = Field(foreign_key="tenants.id", index=True)
    completion_id: str = Field(max_length=256)
    """The id the client saw (``chatcmpl-...``)."""
    model: str = Field(max_length=256)
    """``model`` as the client asked for it."""
    adapter: str = Field(default="", max_length=128)
    """The adapter that served it; empty for the base model."""
    version: int | None = None
    route: str = Field(default="", max_length=64)
    """How the version was chosen (``x-loraplex-route``): production, canary, pinned, an alias."""
    user: str | None = Field(default=None, max_length=256)
    metadata_: dict[str, str] = Field(
        default_factory=dict, sa_column=Column("metadata", JSON, nullable=False)
    )
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_type=DateTime(timezone=True), index=True
    )
    """When the engine answered (its ``created``)."""
    body: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    """``{"request": ..., "response": ...}`` when small; None when in the blob store."""
    body_blob: str | None = Field(default=None, max_length=512)
    body_sha256: str | None = Field(default=None, max_length=64)
    body_bytes: int = 0


class Feedback(SQLModel, table=True):
    __tablename__ = "completion_feedback"

    seq: int | None = Field(default=None, primary_key=True)
    """Order of arrival: what lists sort and page by."""
    id: str = Field(unique=True, max_length=40)
    tenant_id: int = Field(foreign_key="tenants.id", index=True)
    completion: int = Field(foreign_key="stored_completions.id", index=True)
    completion_id: str = Field(max_length=256)
    thumbs: str | None = Field(default=None, max_length=8)
    rating: int | None = None
    correction: str | None = Field(default=None, sa_type=Text)
    """The answer as it should have been."""
    note: str | None = Field(default=None, max_length=MAX_NOTE_CHARS)
    created_at: dt.datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


@dataclass(frozen=True)
class NewCompletion:
    """One answered request, as the gateway hands it over to be stored."""

    tenant_id: int
    completion_id: str
    model: str
    adapter: str
    version: int | None
    route: str
    user: str | None
    metadata: dict[str, str]
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    created_at: dt.datetime
    request: dict[str, Any]
    response: dict[str, Any]


@dataclass(frozen=True)
class Listing:
    """What every list takes: a time window (``created_at``) and a page."""

    created_after: dt.datetime | None = None
    created_before: dt.datetime | None = None
    after: str | None = None
    """The id the previous page ended with."""
    limit: int = 20
    order: Order = "asc"


@dataclass(frozen=True)
class CompletionQuery(Listing):
    """Which of a tenant's stored completions a list returns, and in what order."""

    model: str | None = None
    adapter: str | None = None
    version: int | None = None
    route: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FeedbackQuery(Listing):
    """Which of a tenant's feedback a list returns, and in what order."""

    completion_id: str | None = None
    thumbs: str | None = None


@dataclass(frozen=True)
class FeedbackInput:
    """What a client says about a completion; at least one field is set."""

    thumbs: str | None = None
    rating: int | None = None
    correction: str | None = None
    note: str | None = None


def metadata_problem(value: Any) -> str | None:
    """Why ``value`` is not valid completion metadata (OpenAI's bounds), or None."""
    if not isinstance(value, dict):
        return "`metadata` must be an object of string keys and string values."
    if len(value) > MAX_METADATA_PAIRS:
        return f"`metadata` has {len(value)} keys; at most {MAX_METADATA_PAIRS} are allowed."
    for key, item in value.items():
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_METADATA_KEY:
            return f"`metadata` keys must be strings of 1 to {MAX_METADATA_KEY} characters."
        if _UNSAFE_KEY.search(key):
            return f"`metadata` key {key!r} holds a quote, backslash or control character."
        if not isinstance(item, str) or len(item) > MAX_METADATA_VALUE:
            return f"`metadata[{key}]` must be a string of at most {MAX_METADATA_VALUE} characters."
        if NUL in item:
            return f"`metadata[{key}]` holds a NUL character."
    return None


def check_metadata(value: Any) -> dict[str, str]:
    problem = metadata_problem(value)
    if problem is not None:
        raise InvalidRequest(problem)
    return dict(value)


def _completion_not_found(completion_id: str) -> NotFound:
    return NotFound(
        f"stored chat completion {completion_id!r} does not exist; only completions created "
        "with `store: true` by a tenant with capture on are stored (list them to see their ids)"
    )


def _feedback_not_found(feedback_id: str) -> NotFound:
    return NotFound(f"feedback {feedback_id!r} does not exist; list your feedback to see its ids")


def _holds_nul(*values: str | tuple[str, str] | None) -> bool:
    return any(NUL in "".join(v) if isinstance(v, tuple) else NUL in v for v in values if v)


def _check_settings(settings: CaptureSettings) -> None:
    if not 1 <= settings.retention_days <= MAX_RETENTION_DAYS:
        raise InvalidRequest(f"retention_days must be from 1 to {MAX_RETENTION_DAYS}")
    if not 1 <= settings.max_body_bytes <= MAX_BODY_BYTES:
        raise InvalidRequest(f"max_body_bytes must be from 1 to {MAX_BODY_BYTES}")


def _check_feedback(given: FeedbackInput) -> None:
    if not any(v is not None for v in asdict(given).values()):
        raise InvalidRequest("feedback needs at least one of thumbs, rating, correction or note")
    if given.thumbs is not None and given.thumbs not in THUMBS:
        raise InvalidRequest(f"thumbs must be 'up' or 'down', not {given.thumbs!r}")
    if given.rating is not None and given.rating not in RATINGS:
        raise InvalidRequest(f"rating must be an integer from 1 to 5, not {given.rating!r}")
    if any(NUL in text for text in (given.correction, given.note) if text is not None):
        raise InvalidRequest("correction and note may not hold NUL characters")
    if given.correction is not None and len(given.correction) > MAX_CORRECTION_CHARS:
        raise InvalidRequest(f"correction is longer than {MAX_CORRECTION_CHARS} characters")
    if given.note is not None and len(given.note) > MAX_NOTE_CHARS:
        raise InvalidRequest(f"note is longer than {MAX_NOTE_CHARS} characters")


def _page(query: Any, seq: Any, anchor: int | None, order: Order, limit: int) -> Any:
    """``query`` ordered by ``seq``, from just past ``anchor``, at most ``limit`` rows."""
    if anchor is not None:
        query = query.where(seq > anchor if order == "asc" else seq < anchor)
    return query.order_by(seq.asc() if order == "asc" else seq.desc()).limit(limit)


def _in_time(query: Any, when: Any, after: dt.datetime | None, before: dt.datetime | None) -> Any:
    if after is not None:
        query = query.where(when >= after)
    if before is not None:
        query = query.where(when < before)
    return query


class CaptureStore(Store):
    """Capture settings, stored completions and feedback, on the registry's database and blobs."""

    def __init__(self, registry: Registry, inline_bytes: int = INLINE_BYTES) -> None:
        self.database, self.blobs, self.limits = registry.database, registry.blobs, registry.limits
        self.inline_bytes = inline_bytes

    # -- settings ----------------------------------------------------------------------

    def settings(self, tenant_id: int) -> CaptureSettings:
        """The tenant's capture settings (off, with the defaults, if never set)."""
        with self._read() as s:
            row = s.get(TenantCaptureSettings, tenant_id)
        return CaptureSettings() if row is None else _settings_of(row)

    def set_settings(
        self, tenant: int | str, settings: CaptureSettings, actor: Actor
    ) -> tuple[str, CaptureSettings]:
        """Replace a tenant's capture settings (audited); returns its name and them."""
        _check_settings(settings)
        with self._write() as s:
            row = self._tenant(s, tenant, lock=True)
            assert row.id is not None
            current = s.get(TenantCaptureSettings, row.id)
            before = asdict(_settings_of(current)) if current else None
            s.merge(TenantCaptureSettings(tenant_id=row.id, **asdict(settings)))
            event = audit.record(s, actor.name, "tenant.capture", f"tenant:{row.name}")
            event.tenant_id, event.before, event.after = row.id, before, asdict(settings)
        return row.name, settings

    # -- stored completions ------------------------------------------------------------

    def save(self, records: Sequence[NewCompletion]) -> list[NewCompletion]:
        """Store ``records``; returns those skipped because their tenant already has their id
        (the engine lets clients choose ids; the first record stays)."""
        prepared = [(record, self._body(record)) for record in records]
        try:
            with self._write() as s:
                s.add_all(_row(record, body) for record, body in prepared)
            return []
        except IntegrityError:
            pass
        skipped = []
        for record, body in prepared:  # one at a time: only the duplicates fail
            try:
                with self._write() as s:
                    s.add(_row(record, body))
            except IntegrityError:
                skipped.append(record)
                if body.blob is not None:
                    self.blobs.delete(body.blob)
        return skipped

    def _body(self, record: NewCompletion) -> _Body:
        data = json.dumps({"request": record.request, "response": record.response}).encode()
        if len(data) <= self.inline_bytes:
            return _Body({"request": record.request, "response": record.response}, len(data))
        key = f"captures/{record.tenant_id}/{uuid.uuid4().hex}"
        return _Body(None, len(data), key, put_bytes(self.blobs, key, data))

    def get(self, tenant_id: int, completion_id: str) -> StoredCompletion:
        with self._read() as s:
            return self._get(s, tenant_id, completion_id)

    def _get(
        self, s: Session, tenant_id: int, completion_id: str, lock: bool = False
    ) -> StoredCompletion:
        if NUL in completion_id:  # no id holds one, and PostgreSQL refuses them in queries
            raise _completion_not_found(completion_id)
        query = select(StoredCompletion).where(
            StoredCompletion.tenant_id == tenant_id,
            StoredCompletion.completion_id == completion_id,
        )
        row = s.exec(query.with_for_update() if lock else query).first()
        if row is None:
            raise _completion_not_found(completion_id)
        return row

    def bodies(self, record: StoredCompletion) -> tuple[dict[str, Any], dict[str, Any]]:
        """(request, response) of a record, from its row or its blob."""
        body = record.body
        if body is None:
            assert record.body_blob is not None and record.body_sha256 is not None
            body = json.loads(fetch_bytes(self.blobs, record.body_blob, record.body_sha256))
        return body["request"], body["response"]

    def list_completions(self, tenant_id: int, query: CompletionQuery) -> list[StoredCompletion]:
        with self._read() as s:
            anchor = self._get(s, tenant_id, query.after).id if query.after else None
            if _holds_nul(query.model, query.adapter, query.route, *query.metadata.items()):
                return []  # nothing stored matches (PostgreSQL refuses NULs in queries)
            found = select(StoredCompletion).where(StoredCompletion.tenant_id == tenant_id)
            for name in ("model", "adapter", "version", "route"):
                wanted = getattr(query, name)
                if wanted is not None:
                    found = found.where(getattr(StoredCompletion, name) == wanted)
            stored = StoredCompletion.__table__.c["metadata"]  # type: ignore[attr-defined]
            for key, value in query.metadata.items():
                found = found.where(stored[key].as_string() == value)
            when = col(StoredCompletion.created_at)
            found = _in_time(found, when, query.created_after, query.created_before)
            seq = col(StoredCompletion.id)
            return list(s.exec(_page(found, seq, anchor, query.order, query.limit)).all())

    def update_metadata(
        self, tenant_id: int, completion_id: str, metadata: dict[str, str]
    ) -> StoredCompletion:
        checked = check_metadata(metadata)
        with self._write() as s:
            row = self._get(s, tenant_id, completion_id, lock=True)
            row.metadata_ = checked
            s.add(row)
        return row

    def delete(self, tenant_id: int, completion_id: str) -> None:
        """Delete a stored completion, its feedback and its blob."""
        with self._write() as s:
            row = self._get(s, tenant_id, completion_id, lock=True)
            self._delete_rows(s, [row])
        if row.body_blob is not None:
            self.blobs.delete(row.body_blob)

    def delete_user(self, tenant_id: int, user: str) -> int:
        """Delete every stored completion of one end user (the requests' ``user``), with
        their feedback and blobs; how many there were."""
        deleted = 0
        while True:  # in batches: one user may have many
            with self._write() as s:
                rows = s.exec(
                    select(StoredCompletion)
                    .where(StoredCompletion.tenant_id == tenant_id, StoredCompletion.user == user)
                    .limit(500)
                ).all()
                self._delete_rows(s, rows)
            for row in rows:
                if row.body_blob is not None:
                    self.blobs.delete(row.body_blob)
            deleted += len(rows)
            if len(rows) < 500:
                return deleted

    def _delete_rows(self, s: Session, rows: Sequence[StoredCompletion]) -> None:
        ids = [row.id for row in rows]
        s.execute(delete(Feedback).where(col(Feedback.completion).in_(ids)))
        s.execute(delete(StoredCompletion).where(col(StoredCompletion.id).in_(ids)))

    # -- retention ---------------------------------------------------------------------

    def purge(self, now: dt.datetime | None = None) -> int:
        """Delete every record older than its tenant's retention; returns how many."""
        now = now or utcnow()
        with self._read() as s:
            tenants = list(s.exec(select(TenantCaptureSettings)).all())
        removed = 0
        for tenant in tenants:
            cutoff = now - dt.timedelta(days=tenant.retention_days)
            while batch := self._purge_batch(tenant.tenant_id, cutoff):
                removed += batch
        return removed

    def _purge_batch(self, tenant_id: int, cutoff: dt.datetime) -> int:
        with self._write() as s:
            query = select(StoredCompletion).where(
                StoredCompletion.tenant_id == tenant_id, col(StoredCompletion.created_at) < cutoff
            )
            if self.database.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)  # another gateway's purge
            rows = list(s.exec(query.limit(PURGE_BATCH)).all())
            if rows:
                self._delete_rows(s, rows)
        for row in rows:  # after the commit: a blob is never gone while its row is there
            if row.body_blob is not None:
                self.blobs.delete(row.body_blob)
        return len(rows)

    # -- feedback ----------------------------------------------------------------------

    def add_feedback(self, tenant_id: int, completion_id: str, given: FeedbackInput) -> Feedback:
        _check_feedback(given)
        with self._write() as s:
            stored = self._get(s, tenant_id, completion_id)
            assert stored.id is not None
            row = Feedback(
                id=f"feedback-{uuid.uuid4().hex[:24]}",
                tenant_id=tenant_id,
                completion=stored.id,
                completion_id=completion_id,
                **asdict(given),
            )
            s.add(row)
        return row

    def list_feedback(self, tenant_id: int, query: FeedbackQuery) -> list[Feedback]:
        with self._read() as s:
            if query.completion_id is not None:
                self._get(s, tenant_id, query.completion_id)
            anchor = self._feedback_seq(s, tenant_id, query.after) if query.after else None
            found = select(Feedback).where(Feedback.tenant_id == tenant_id)
            if query.completion_id is not None:
                found = found.where(Feedback.completion_id == query.completion_id)
            if query.thumbs is not None:
                found = found.where(Feedback.thumbs == query.thumbs)
            when = col(Feedback.created_at)
            found = _in_time(found, when, query.created_after, query.created_before)
            return list(s.exec(_page(found, col(Feedback.seq), anchor, query.order, query.limit)))

    def latest_feedback(
        self, tenant_id: int, rows: Sequence[StoredCompletion]
    ) -> dict[int, Feedback]:
        """Each given completion's latest feedback, by the completion's row id (those with any)."""
        ids = [row.id for row in rows]
        latest: dict[int, Feedback] = {}
        with self._read() as s:
            found = s.exec(
                select(Feedback)
                .where(Feedback.tenant_id == tenant_id, col(Feedback.completion).in_(ids))
                .order_by(col(Feedback.seq))
            )
            for item in found:
                latest[item.completion] = item  # later ones replace earlier ones
        return latest

    def _feedback_seq(self, s: Session, tenant_id: int, feedback_id: str) -> int | None:
        if NUL in feedback_id:
            raise _feedback_not_found(feedback_id)
        row = s.exec(select(Feedback).where(Feedback.id == feedback_id)).first()
        if row is None or row.tenant_id != tenant_id:
            raise _feedback_not_found(feedback_id)
        return row.seq

    def with_completions(
        self, tenant_id: int, feedback: Sequence[Feedback]
    ) -> Iterator[tuple[Feedback, StoredCompletion]]:
        """Each feedback with the completion it is about (for exports)."""
        ids = {f.completion for f in feedback}
        with self._read() as s:
            rows = s.exec(
                select(StoredCompletion).where(
                    StoredCompletion.tenant_id == tenant_id, col(StoredCompletion.id).in_(ids)
                )
            )
            by_id = {row.id: row for row in rows}
        for item in feedback:
            yield item, by_id[item.completion]


@dataclass(frozen=True)
class _Body:
    inline: dict[str, Any] | None
    size: int
    blob: str | None = None
    sha256: str | None = None


def _row(record: NewCompletion, body: _Body) -> StoredCompletion:
    columns = {f.name: getattr(record, f.name) for f in fields(record)}
    for name in _NOT_COLUMNS:
        del columns[name]
    columns.update(body=body.inline, body_blob=body.blob, body_sha256=body.sha256)
    return StoredCompletion(**columns, metadata_=record.metadata, body_bytes=body.size)


_NOT_COLUMNS = ("request", "response", "metadata")
"""``NewCompletion`` fields that are not columns of the same name."""


def _settings_of(row: TenantCaptureSettings) -> CaptureSettings:
    return CaptureSettings(
        enabled=row.enabled,
        store_by_default=row.store_by_default,
        retention_days=row.retention_days,
        max_body_bytes=row.max_body_bytes,
    )
