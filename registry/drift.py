"""Prompt drift: how far an adapter's live prompts have moved from its training data's.

Both sides are summarised the same way, as a ``PromptSketch``: a histogram of prompt
lengths and counts of hashed word n-grams. The reference sketch of a version is made from
its training file's prompts when a job registers it (``set_reference``); versions pushed
without training data have none, and their drift is unknown, never an error. The live
sketch of an adapter is accumulated per UTC day from the prompts the gateways route to it
(``add_live``; the gateway keeps the sketch whether or not the tenant captures, so there
is one mechanism and one set of numbers).

``report`` compares the last days' live sketch with the reference of the adapter's
production version: the drift score is the mean of the Jensen-Shannon distances (base 2,
so from 0, the same distributions, to 1, disjoint ones) of the two length histograms and
of the two n-gram distributions. ``check`` records ``adapter.drift`` in the audit log when
the score first goes past the threshold, and ``adapter.drift_cleared`` when it falls back:
one event per crossing, however many gateways check.

Everything is tenant-scoped: a foreign adapter answers exactly like an unknown one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import JSON, Date, DateTime, UniqueConstraint, delete
from sqlmodel import Field, Session, SQLModel, col, select

from registry import audit, lifecycle
from registry.errors import InvalidRequest
from registry.models import PRODUCTION, Adapter, AdapterVersion, Tenant, utcnow
from registry.registry import Registry
from registry.store import Store
from registry.values import Actor

LENGTH_BUCKETS = 12
"""Length buckets: 0 words, 1, 2-3, 4-7, ... (log2), the last one 1,024 words or more."""
NGRAM_BUCKETS = 512
"""Buckets the hashed unigrams and bigrams fall into."""
MEASURED_CHARS = 16 << 10
"""Characters of a prompt its length is counted in (the top bucket holds longer ones)."""
HASHED_CHARS = 4 << 10
"""Characters of a prompt whose n-grams are hashed: bounds the cost of a long prompt."""
MIN_LIVE_PROMPTS = 20
"""Live prompts a score needs; with fewer, drift is unknown (too noisy to mean anything)."""
DEFAULT_THRESHOLD = 0.35
"""Score past which an adapter is said to drift, unless the caller sets another."""
DEFAULT_DAYS = 7
MAX_DAYS = 90

DRIFT = "adapter.drift"
DRIFT_CLEARED = "adapter.drift_cleared"


class InvalidSketch(ValueError):
    """A stored sketch's JSON does not have the buckets this module makes (a fault of the
    database's contents, not of any request)."""


@dataclass(frozen=True)
class PromptSketch:
    """A summary of some prompts: how many, their lengths, and their word n-grams.

    Lengths are counted in whitespace-separated words, not tokens: words stand in for
    tokens so both sides (the trainer and the gateway) use the same measure without a
    tokenizer in the gateway. N-grams are lower-cased word unigrams and bigrams, hashed
    with BLAKE2b (stable across processes, unlike ``hash()``) into ``NGRAM_BUCKETS``.
    """

    prompts: int = 0
    lengths: tuple[int, ...] = (0,) * LENGTH_BUCKETS
    """Prompts per log2 bucket of their word count."""
    ngrams: tuple[int, ...] = (0,) * NGRAM_BUCKETS
    """N-grams per hash bucket."""

    def to_json(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "lengths": list(self.lengths), "ngrams": list(self.ngrams)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PromptSketch:
        prompts = data.get("prompts")
        if not isinstance(prompts, int) or prompts < 0:
            raise InvalidSketch("a prompt sketch's `prompts` must be a count")
        return cls(
            prompts,
            _counts(data.get("lengths"), "lengths", LENGTH_BUCKETS),
            _counts(data.get("ngrams"), "ngrams", NGRAM_BUCKETS),
        )


def _counts(value: Any, name: str, size: int) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) != size:
        raise InvalidSketch(f"a prompt sketch's `{name}` must be a list of {size} counts")
    if not all(isinstance(n, int) and n >= 0 for n in value):
        raise InvalidSketch(f"a prompt sketch's `{name}` must hold counts")
    return tuple(value)


def prompts_of(record: dict[str, Any]) -> list[str]:
    """The prompts of a request or a training example, the same way for both: the last
    user message of a chat (``messages``), or the ``prompt`` of a completion (each one of
    a batch; token ids are not text and give none)."""
    messages = record.get("messages")
    if messages is None and isinstance(record.get("prompt"), list):
        if all(isinstance(p, str) for p in record["prompt"]):
            return list(record["prompt"])
        messages = record["prompt"]  # a preference example's prompt as messages
    if messages is None:
        prompt = record.get("prompt")
        return [prompt] if isinstance(prompt, str) else []
    if not isinstance(messages, list):
        return []
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            text = _text_of(message.get("content"))
            return [] if text is None else [text]
    return []


def _text_of(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only the text ones are prompt words
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return None


def length_bucket(words: int) -> int:
    return min(words.bit_length(), LENGTH_BUCKETS - 1)


def _bucket(gram: str) -> int:
    digest = hashlib.blake2b(gram.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % NGRAM_BUCKETS


def sketch_prompts(texts: Iterable[str]) -> PromptSketch:
    """The sketch of ``texts``, each one prompt."""
    prompts = 0
    lengths = [0] * LENGTH_BUCKETS
    ngrams = [0] * NGRAM_BUCKETS
    for text in texts:
        prompts += 1
        lengths[length_bucket(len(text[:MEASURED_CHARS].split()))] += 1
        words = text[:HASHED_CHARS].lower().split()
        for i, word in enumerate(words):
            ngrams[_bucket(word)] += 1
            if i:
                ngrams[_bucket(f"{words[i - 1]} {word}")] += 1
    return PromptSketch(prompts, tuple(lengths), tuple(ngrams))


def merge(a: PromptSketch, b: PromptSketch) -> PromptSketch:
    """The sketch of ``a``'s prompts and ``b``'s together."""
    return PromptSketch(
        a.prompts + b.prompts,
        tuple(x + y for x, y in zip(a.lengths, b.lengths, strict=True)),
        tuple(x + y for x, y in zip(a.ngrams, b.ngrams, strict=True)),
    )


def js_distance(p: Sequence[int], q: Sequence[int]) -> float:
    """Jensen-Shannon distance (base 2) of two count vectors' distributions, in [0, 1].

    Two empty vectors are the same (0); an empty and a non-empty one share nothing (1).
    """
    p_total, q_total = sum(p), sum(q)
    if p_total == 0 or q_total == 0:
        return 0.0 if p_total == q_total else 1.0
    divergence = 0.0
    for x, y in zip(p, q, strict=True):
        pi, qi = x / p_total, y / q_total
        mi = (pi + qi) / 2
        if pi:
            divergence += pi * math.log2(pi / mi) / 2
        if qi:
            divergence += qi * math.log2(qi / mi) / 2
    return math.sqrt(min(1.0, max(0.0, divergence)))


@dataclass(frozen=True)
class Distances:
    """How far two sketches are: per part, and the drift score (their mean)."""

    lengths: float
    ngrams: float

    @property
    def score(self) -> float:
        return (self.lengths + self.ngrams) / 2


def distances(reference: PromptSketch, live: PromptSketch) -> Distances:
    return Distances(
        js_distance(reference.lengths, live.lengths), js_distance(reference.ngrams, live.ngrams)
    )


def drift_score(reference: PromptSketch, live: PromptSketch) -> float:
    """The mean of the length histograms' and the n-gram distributions' JS distances."""
    return distances(reference, live).score


# -- tables ------------------------------------------------------------------------------


class DriftReference(SQLModel, table=True):
    """The sketch of the prompts a version was trained on."""

    __tablename__ = "drift_references"

    version_id: int = Field(primary_key=True, foreign_key="adapter_versions.id")
    prompts: int
    sketch: dict[str, Any] = Field(sa_type=JSON)
    created_at: dt.datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class DriftLive(SQLModel, table=True):
    """The sketch of the prompts routed to a tenant's adapter on one UTC day."""

    __tablename__ = "drift_live"
    __table_args__ = (UniqueConstraint("tenant_id", "adapter", "day"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenants.id", index=True)
    adapter: str = Field(max_length=128)
    day: dt.date = Field(sa_type=Date)
    prompts: int
    sketch: dict[str, Any] = Field(sa_type=JSON)
    updated_at: dt.datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class DriftState(SQLModel, table=True):
    """An adapter's last checked drift: what decides whether a check is a crossing."""

    __tablename__ = "drift_states"

    tenant_id: int = Field(primary_key=True, foreign_key="tenants.id")
    adapter: str = Field(primary_key=True, max_length=128)
    score: float | None = None
    over: bool = False
    """Past the threshold at the last check that knew the score."""
    changed_at: dt.datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    """When ``over`` last changed (its event's time)."""
    checked_at: dt.datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


# -- the store ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftReport:
    """An adapter's drift over the last ``days``: the score, or why it is unknown."""

    adapter: str
    score: float | None
    """None when unknown (``reason`` says why)."""
    threshold: float
    over: bool
    """The score is past the threshold."""
    live_prompts: int
    reference_prompts: int | None
    """Prompts in the production version's reference; None when it has none."""
    version: int | None
    """The production version compared against."""
    days: int
    lengths: float | None = None
    """The length histograms' distance (one half of the score)."""
    ngrams: float | None = None
    """The n-gram distributions' distance (the other half)."""
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "score": self.score,
            "threshold": self.threshold,
            "over_threshold": self.over,
            "live_prompts": self.live_prompts,
            "reference_prompts": self.reference_prompts,
            "version": self.version,
            "days": self.days,
            "length_distance": self.lengths,
            "ngram_distance": self.ngrams,
            "reason": self.reason,
        }


def check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise InvalidRequest(f"a drift threshold is from 0 to 1, not {threshold}")
    return threshold


def check_days(days: int) -> int:
    if not 1 <= days <= MAX_DAYS:
        raise InvalidRequest(f"days must be from 1 to {MAX_DAYS}, not {days}")
    return days


def today() -> dt.date:
    return utcnow().date()


class DriftStore(Store):
    """Reference and live prompt sketches, drift reports and drift events."""

    def __init__(self, registry: Registry, min_live_prompts: int = MIN_LIVE_PROMPTS) -> None:
        self.database, self.blobs, self.limits = registry.database, registry.blobs, registry.limits
        self.min_live_prompts = min_live_prompts

    def set_reference(self, version_id: int, sketch: PromptSketch) -> None:
        """Make ``sketch`` the reference of a version (replacing any it had)."""
        with self._write() as s:
            self.set_reference_in(s, version_id, sketch)

    def set_reference_in(self, s: Session, version_id: int, sketch: PromptSketch) -> None:
        """``set_reference`` in the caller's write transaction."""
        row = DriftReference(version_id=version_id, prompts=sketch.prompts, sketch=sketch.to_json())
        s.merge(row)

    def reference(self, version_id: int) -> PromptSketch | None:
        with self._read() as s:
            row = s.get(DriftReference, version_id)
        return None if row is None else PromptSketch.from_json(row.sketch)

    def add_live(
        self, tenant_id: int, adapter: str, sketch: PromptSketch, day: dt.date | None = None
    ) -> None:
        """Merge ``sketch`` into the adapter's live sketch of ``day`` (today, UTC).

        Gateways add concurrently: the day's row is locked while merging, and a row two
        gateways create at once makes one of them fail on the unique key and merge again.
        """
        if sketch.prompts == 0:
            return
        when = day or today()
        self._retrying(lambda: self._add_live_once(tenant_id, adapter, sketch, when), retries=3)

    def _add_live_once(
        self, tenant_id: int, adapter: str, sketch: PromptSketch, day: dt.date
    ) -> None:
        with self._write() as s:
            query = select(DriftLive).where(
                DriftLive.tenant_id == tenant_id, DriftLive.adapter == adapter, DriftLive.day == day
            )
            row = s.exec(query.with_for_update()).first()
            if row is None:
                row = DriftLive(tenant_id=tenant_id, adapter=adapter, day=day, prompts=0, sketch={})
                total = sketch
            else:
                total = merge(PromptSketch.from_json(row.sketch), sketch)
            row.prompts, row.sketch, row.updated_at = total.prompts, total.to_json(), utcnow()
            s.add(row)

    def live(self, tenant_id: int, adapter: str, days: int = DEFAULT_DAYS) -> PromptSketch:
        """The adapter's live sketch over the last ``days`` UTC days (today included)."""
        with self._read() as s:
            return self._live(s, tenant_id, adapter, days)

    def _live(self, s: Session, tenant_id: int, adapter: str, days: int) -> PromptSketch:
        since = today() - dt.timedelta(days=days - 1)
        rows = s.exec(
            select(DriftLive).where(
                DriftLive.tenant_id == tenant_id,
                DriftLive.adapter == adapter,
                col(DriftLive.day) >= since,
            )
        )
        total = PromptSketch()
        for row in rows:
            total = merge(total, PromptSketch.from_json(row.sketch))
        return total

    def purge(self, keep_days: int = MAX_DAYS) -> int:
        """Delete live sketches of days no report can reach any more; how many."""
        before = today() - dt.timedelta(days=keep_days - 1)  # a report's oldest day
        with self._write() as s:
            gone = s.execute(delete(DriftLive).where(col(DriftLive.day) < before))
        return int(gone.rowcount)  # type: ignore[attr-defined]

    def report(
        self,
        tenant_id: int,
        adapter: str,
        days: int = DEFAULT_DAYS,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> DriftReport:
        """The adapter's drift over the last ``days``; ``NotFound`` for an unknown (or
        foreign) adapter. Unknown drift is a report with ``score`` None and a reason."""
        check_days(days)
        check_threshold(threshold)
        with self._read() as s:
            owner = self._own_adapter(s, tenant_id, adapter)
            live = self._live(s, tenant_id, adapter, days)
            version = self._production(s, owner)
            reference = s.get(DriftReference, version.id) if version is not None else None
        unknown = DriftReport(adapter, None, threshold, False, live.prompts, None, None, days)
        if version is None:
            return _with(unknown, reason="the adapter has no production version to compare with")
        if reference is None:
            return _with(
                unknown,
                version=version.number,
                reason=f"production version {version.number} has no reference sketch (it was "
                "not trained by a job here, so its training prompts are unknown)",
            )
        unknown = _with(unknown, version=version.number, reference_prompts=reference.prompts)
        if live.prompts < self.min_live_prompts:
            return _with(
                unknown,
                reason=f"{live.prompts} live prompts in the last {days} days; a score needs "
                f"at least {self.min_live_prompts}",
            )
        apart = distances(PromptSketch.from_json(reference.sketch), live)
        return _with(
            unknown,
            score=apart.score,
            over=apart.score > threshold,
            lengths=apart.lengths,
            ngrams=apart.ngrams,
        )

    def _production(self, s: Session, adapter: Adapter) -> AdapterVersion | None:
        assert adapter.id is not None
        alias = lifecycle.aliases(s, adapter.id).get(PRODUCTION)
        return None if alias is None else s.get(AdapterVersion, alias.version_id)

    def check(
        self,
        tenant_id: int,
        adapter: str,
        actor: Actor,
        days: int = DEFAULT_DAYS,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> DriftReport:
        """``report``, remembered; the first report past the threshold records
        ``adapter.drift``, and the first back under it ``adapter.drift_cleared``.

        An unknown score changes nothing: it is neither a crossing nor a clearing."""
        found = self.report(tenant_id, adapter, days, threshold)
        self._retrying(lambda: self._remember(tenant_id, found, actor), retries=3)
        return found

    def _remember(self, tenant_id: int, found: DriftReport, actor: Actor) -> None:
        with self._write() as s:
            query = select(DriftState).where(
                DriftState.tenant_id == tenant_id, DriftState.adapter == found.adapter
            )
            state = s.exec(query.with_for_update()).first()
            if state is None:
                state = DriftState(tenant_id=tenant_id, adapter=found.adapter)
            was_over = state.over
            state.score, state.checked_at = found.score, utcnow()
            if found.score is not None and found.over != was_over:
                state.over, state.changed_at = found.over, state.checked_at
                self._record(s, tenant_id, found, actor)
            s.add(state)

    def _record(self, s: Session, tenant_id: int, found: DriftReport, actor: Actor) -> None:
        tenant = s.get(Tenant, tenant_id)
        owner = tenant.name if tenant is not None else tenant_id
        after = {
            k: v
            for k, v in found.to_json().items()
            if k in ("score", "threshold", "version", "live_prompts", "days")
        }
        action = DRIFT if found.over else DRIFT_CLEARED
        subject = f"adapter:{owner}/{found.adapter}"
        audit.record(s, actor.name, action, subject, tenant_id=tenant_id, after=after)

    def state(self, tenant_id: int, adapter: str) -> DriftState | None:
        """The adapter's last check, or None if none ran (``NotFound`` for a foreign one)."""
        with self._read() as s:
            self._own_adapter(s, tenant_id, adapter)
            return s.get(DriftState, (tenant_id, adapter))


def _with(report: DriftReport, **changes: Any) -> DriftReport:
    return replace(report, **changes)
