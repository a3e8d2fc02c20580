"""Base upgrades: every adapter served on an old base moved to a new one, as one operation.

An upgrade (``base_upgrades``) has one item (``base_upgrade_items``) per adapter whose
production version is pinned to the old base. All of its state is in the database:
``advance`` is an idempotent step that anyone may call any number of times (the workers'
loop does, ``loraplex bases upgrades --follow`` does), so a restart continues where the
last step left off. Each item transition is one transaction that changes the item (and
the aliases, versions or jobs it moves), writes its audit event and so its public event
(``adapter.upgrade.*``, in the owning tenant's log; ``base.upgrade.*`` for the operation).

An item's states::

    planned -> evaluating -> meets_bar -(owner: retire)-> retired
                   |             `-(owner: retrain, or no answer by the deadline)-.
                   `-(the base alone misses the bar)-> retraining <--------------'
    retraining -> canary -> promoted -> migrated          (any of them -> failed)
    planned (uploaded) -> awaiting_owner -(past the deadline)-> retired | kept

- **trained** items (the version came from a fine-tuning job whose training file is
  still there) first get an *evaluation-only* job on the new base (``method``
  ``evaluation``: the worker prepares the job's data with its recorded config and seed, so
  the same test split, and scores the base alone on it). The bar is the old version's
  recorded ``fine-tune-test`` value of the metric that decides for its task (exact match
  where the answers come from a fixed set, else loss; ``training.promotion``) and its
  gates' minimums on that suite; the base alone *meets* it when it is at most
  ``bar_margin`` worse. Then the owner chooses (``choose``): retire the adapter, or
  retrain. Otherwise it is retrained: an ordinary job on the new base copying the old
  version's job (file or dataset version, method, hyperparameters, seed, schema, regex),
  from scratch, into the same adapter. Such a job never promotes its version itself
  (``JobStore`` promotes no version over a production version on another base).
- The retrained version must pass the adapter's gates (with none: be no worse than the old
  version on the deciding metric by ``bar_margin``), then gets a canary at
  ``canary_weight``; after ``canary_seconds``, if its online error rate
  (``registry.online_metrics``) is no worse than production's over the same window, it is
  promoted (the canary cleared), else the canary is cleared and the item fails. Then the
  adapter's versions on the old base that no alias holds are retired.
- **uploaded** items cannot be retrained: the owner is told (``action_required``, with the
  deadline) and, past the deadline, the version is retired or kept on the old base, as the
  operator chose.

Everything a tenant reaches is tenant-scoped: a foreign adapter answers like an unknown one.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import JSON, UniqueConstraint
from sqlmodel import Field, Session, SQLModel, col, select

from registry import audit, lifecycle
from registry.custom_aliases import DELETE_ACTION
from registry.errors import Conflict, InvalidRequest, NotFound, RegistryError
from registry.gates import latest_value
from registry.jobs import (
    FINISHED,
    SUCCEEDED,
    FineTuningEvent,
    FineTuningJob,
    JobStore,
    TrainingFile,
    new_id,
)
from registry.models import (
    CANARY,
    PRODUCTION,
    RETIRED,
    SHADOW,
    Adapter,
    AdapterVersion,
    Alias,
    BaseModelRecord,
    EvalResult,
    PromotionGate,
    Tenant,
    timestamp_column,
    utcnow,
)
from registry.online_metrics import ERROR_RATE, online_metrics
from registry.registry import Registry
from registry.store import Store
from registry.values import Actor

EVALUATION = "evaluation"
"""The ``method`` of an evaluation-only job: it scores the base alone, registers nothing."""
TEST_SUITE = "fine-tune-test"
"""Where a job records its version's test-split metrics (``training.worker.TEST_SUITE``)."""

RUNNING, DONE, CANCELLED_UPGRADE = "running", "done", "cancelled"
PLANNED, EVALUATING, MEETS_BAR, AWAITING_OWNER = "planned", "evaluating", "meets_bar", "awaiting"
RETRAINING, IN_CANARY, PROMOTED = "retraining", "canary", "promoted"
MIGRATED, RETIRED_ITEM, KEPT, FAILED, CANCELLED_ITEM = (
    "migrated", "retired", "kept", "failed", "cancelled",
)  # fmt: skip
FINAL = (MIGRATED, RETIRED_ITEM, KEPT, FAILED, CANCELLED_ITEM)
TRAINED, UPLOADED = "trained", "uploaded"
CHOICES = ("retire", "retrain")

DEFAULT_DEADLINE = dt.timedelta(days=14)


class BaseUpgrade(SQLModel, table=True):
    __tablename__ = "base_upgrades"

    id: str = Field(primary_key=True, max_length=40)
    old_base_id: int = Field(foreign_key="base_models.id", index=True)
    new_base_id: int = Field(foreign_key="base_models.id")
    state: str = Field(default=RUNNING, max_length=16, index=True)
    options: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    """``UpgradeOptions.to_json``, the deadline set."""
    report: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    """Set when it is done or cancelled: what each item ended as, and what is left."""
    created_by: str = Field(default="", max_length=256)
    created_at: dt.datetime = timestamp_column()
    updated_at: dt.datetime = timestamp_column()


class BaseUpgradeItem(SQLModel, table=True):
    __tablename__ = "base_upgrade_items"
    __table_args__ = (UniqueConstraint("upgrade_id", "adapter_id"),)

    id: int | None = Field(default=None, primary_key=True)
    upgrade_id: str = Field(foreign_key="base_upgrades.id", index=True, max_length=40)
    tenant_id: int = Field(foreign_key="tenants.id", index=True)
    adapter_id: int = Field(foreign_key="adapters.id")
    adapter: str = Field(max_length=128)
    old_version: int
    old_version_id: int = Field(foreign_key="adapter_versions.id")
    kind: str = Field(max_length=16)
    """``trained`` (it has a job to retrain from) or ``uploaded``."""
    state: str = Field(default=PLANNED, max_length=16)
    metric: str | None = Field(default=None, max_length=64)
    """The metric that decides for the adapter's task (``exact_match`` or ``loss``)."""
    eval_job: str | None = Field(default=None, foreign_key="fine_tuning_jobs.id", max_length=40)
    retrain_job: str | None = Field(default=None, foreign_key="fine_tuning_jobs.id", max_length=40)
    scores: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    """``old``, ``base`` (the new base alone) and ``new`` values of ``metric``, ``bar``."""
    new_version: int | None = None
    deadline: dt.datetime | None = timestamp_column(nullable=True)
    canary_started_at: dt.datetime | None = timestamp_column(nullable=True)
    choice: str | None = Field(default=None, max_length=16)
    note: str = Field(default="", max_length=2048)
    """Why it is in its state, with the numbers."""
    updated_at: dt.datetime = timestamp_column()


@dataclass(frozen=True)
class UpgradeOptions:
    """What the operator sets for one upgrade."""

    deadline: dt.datetime | None = None
    """When owners must have acted (uploaded adapters, and the choice where the new base
    alone meets the bar), in UTC; None: 14 days after the start."""
    uploaded_past_deadline: str = "keep"
    """What happens to an uploaded adapter's version past the deadline: ``retire`` it, or
    ``keep`` it serving on the old base."""
    unanswered_past_deadline: str = "retrain"
    """An owner's choice not made by the deadline: ``retrain`` or ``retire``."""
    canary_weight: float = 0.1
    """The share of the adapter's traffic the retrained version gets before promotion."""
    canary_seconds: float = 600.0
    """How long the canary runs before its online error rate is compared and it is promoted."""
    bar_margin: float = 0.05
    """How much worse than the old version (exact match points, or loss) still counts as
    meeting its bar, for the base alone and for the retrained version."""
    retire_grace_seconds: float = 5.0
    """How long the old version stays active after the new one is promoted, before it is
    retired: gateways cache an adapter's routing for up to a second, so a request routed
    just before the promotion still finds the old version servable."""

    def problems(self) -> list[str]:
        """Every problem with these options (empty: none)."""
        found = []
        if self.deadline is not None and self.deadline.tzinfo is None:
            found.append("deadline must be a UTC datetime with its offset (…Z or +00:00)")
        if self.uploaded_past_deadline not in ("retire", "keep"):
            found.append("uploaded_past_deadline must be 'retire' or 'keep'")
        if self.unanswered_past_deadline not in CHOICES:
            found.append("unanswered_past_deadline must be 'retrain' or 'retire'")
        if not (math.isfinite(self.canary_weight) and 0.0 < self.canary_weight <= 1.0):
            found.append("canary_weight must be in (0, 1], like 0.1")
        if not (math.isfinite(self.canary_seconds) and self.canary_seconds >= 0):
            found.append("canary_seconds must be a number of seconds, 0 or more")
        if not (math.isfinite(self.bar_margin) and self.bar_margin >= 0):
            found.append("bar_margin must be 0 or more")
        if not (math.isfinite(self.retire_grace_seconds) and self.retire_grace_seconds >= 0):
            found.append("retire_grace_seconds must be a number of seconds, 0 or more")
        return found

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["deadline"] = None if self.deadline is None else self.deadline.isoformat()
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> UpgradeOptions:
        deadline = values.get("deadline")
        parsed = None if deadline is None else dt.datetime.fromisoformat(deadline)
        return cls(**{**values, "deadline": parsed})


@dataclass(frozen=True)
class PlanItem:
    """One adapter an upgrade would move (a dry run's row)."""

    tenant: str
    adapter: str
    version: int
    kind: str
    source: str
    """Where a retrain takes its data (``dataset NAME@N``, ``file ID``), or why it cannot."""
    method: str | None
    suites: list[str]
    gates: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"object": "base.upgrade.plan_item", **asdict(self)}


@dataclass(frozen=True)
class Plan:
    old: str
    new: str
    items: list[PlanItem]

    def to_json(self) -> dict[str, Any]:
        return {"object": "base.upgrade.plan", "old_base": self.old, "new_base": self.new,
                "items": [i.to_json() for i in self.items]}  # fmt: skip


@dataclass(frozen=True)
class UpgradeView:
    """An upgrade with its bases' names and its items (with their tenants' names)."""

    row: BaseUpgrade
    old: str
    new: str
    items: list[tuple[BaseUpgradeItem, str]]

    def to_json(self) -> dict[str, Any]:
        row = self.row
        return {
            "object": "base.upgrade", "id": row.id, "old_base": self.old, "new_base": self.new,
            "state": row.state, "options": row.options, "report": row.report,
            "created_by": row.created_by, "created_at": _iso(row.created_at),
            "updated_at": _iso(row.updated_at), "progress": progress(self.items),
            "items": [item_json(item, tenant) for item, tenant in self.items],
        }  # fmt: skip


@dataclass(frozen=True)
class UpgradeTransition:
    """One step ``advance`` took: the item (None: the operation) and what happened."""

    adapter: str | None
    tenant: str | None
    state: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Step:
    """What an item's handler works with, in its transaction."""

    s: Session
    upgrade: BaseUpgrade
    item: BaseUpgradeItem
    now: dt.datetime
    options: UpgradeOptions
    health: tuple[bool, str] | None = None
    """For a canary due for promotion: (healthy, why), measured before the transaction."""
    done: list[str] = field(default_factory=list)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else _aware(value).isoformat()


def _aware(value: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def item_json(item: BaseUpgradeItem, tenant: str) -> dict[str, Any]:
    return {
        "object": "base.upgrade.item", "upgrade": item.upgrade_id, "tenant": tenant,
        "adapter": item.adapter, "old_version": item.old_version, "kind": item.kind,
        "state": item.state, "final": item.state in FINAL, "metric": item.metric,
        "scores": item.scores, "eval_job": item.eval_job, "retrain_job": item.retrain_job,
        "new_version": item.new_version, "deadline": _iso(item.deadline),
        "choice": item.choice, "note": item.note, "updated_at": _iso(item.updated_at),
    }  # fmt: skip


def progress(items: list[tuple[BaseUpgradeItem, str]]) -> dict[str, int]:
    """How many items are in each state, and how many are final."""
    counts: dict[str, int] = {}
    for item, _ in items:
        counts[item.state] = counts.get(item.state, 0) + 1
    return {"total": len(items), "final": sum(i.state in FINAL for i, _ in items), **counts}


def _not_found(upgrade_id: str) -> NotFound:
    return NotFound(f"base upgrade {upgrade_id!r} does not exist; list the upgrades to see ids")


def _no_item(adapter: str, upgrade_id: str) -> NotFound:
    # The same words for another tenant's adapter and for one the upgrade does not move.
    return NotFound(
        f"adapter {adapter!r} is not part of base upgrade {upgrade_id!r}; list your "
        "upgrades (GET /v1/upgrades) to see yours"
    )


class UpgradeStore(Store):
    """Base upgrades and their items, on the registry's database."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.database, self.blobs, self.limits = registry.database, registry.blobs, registry.limits

    # -- plan and start ------------------------------------------------------------------

    def plan(self, old: str, new: str) -> Plan:
        """What ``start`` would move (a dry run: writes nothing)."""
        with self._read() as s:
            old_base, new_base = self._bases(s, old, new)
            rows = self._served(s, old_base)
            items = [
                self._plan_item(s, version, adapter, tenant) for version, adapter, tenant in rows
            ]
        return Plan(_label(old_base), _label(new_base), items)

    def _bases(self, s: Session, old: str, new: str) -> tuple[BaseModelRecord, BaseModelRecord]:
        old_base, new_base = self.registry._base(s, old), self.registry._base(s, new)
        if old_base.id == new_base.id:
            raise InvalidRequest(f"{old!r} and {new!r} name the same base; name two bases")
        if new_base.deprecated_at is not None:
            raise Conflict(f"base {new!r} is deprecated; upgrade to a base that is not")
        return old_base, new_base

    @staticmethod
    def _served(s: Session, base: BaseModelRecord) -> list[tuple[AdapterVersion, Adapter, Tenant]]:
        """The production versions pinned to ``base``, with their adapters and tenants."""
        query = (
            select(AdapterVersion, Adapter, Tenant)
            .join(Alias, col(Alias.version_id) == AdapterVersion.id)
            .join(Adapter, col(Adapter.id) == AdapterVersion.adapter_id)
            .join(Tenant, col(Tenant.id) == Adapter.tenant_id)
            .where(Alias.name == PRODUCTION, AdapterVersion.base_id == base.id)
            .order_by(col(Tenant.name), col(Adapter.name))
        )
        return [(v, a, t) for v, a, t in s.exec(query).all()]

    def _plan_item(
        self, s: Session, version: AdapterVersion, adapter: Adapter, tenant: Tenant
    ) -> PlanItem:
        job, why = _source_job(s, version)
        source = why
        if job is not None:
            source = _dataset_label(s, job) or f"file {job.training_file}"
        suites = s.exec(
            select(EvalResult.suite).where(EvalResult.version_id == version.id).distinct()
        ).all()
        gates = s.exec(select(PromotionGate).where(PromotionGate.adapter_id == adapter.id)).all()
        return PlanItem(
            tenant.name, adapter.name, version.number, TRAINED if job else UPLOADED, source,
            job.method if job else None, sorted(suites), [f"{g.suite}/{g.metric}" for g in gates],
        )  # fmt: skip

    def start(self, old: str, new: str, options: UpgradeOptions, actor: Actor) -> UpgradeView:
        """Begin upgrading every adapter served on ``old`` to ``new`` (nothing moves until
        ``advance``); refused while another upgrade of ``old`` runs."""
        problems = options.problems()
        now = utcnow()
        if options.deadline is not None and not problems and options.deadline <= now:
            problems.append("deadline must be in the future")
        if problems:
            raise InvalidRequest("; ".join(problems))
        deadline = options.deadline or now + DEFAULT_DEADLINE
        chosen = UpgradeOptions(**{**asdict(options), "deadline": deadline})
        with self._write() as s:
            old_base, new_base = self._bases(s, old, new)
            self._refuse_running(s, old_base)
            row = BaseUpgrade(
                id=f"upg_{uuid.uuid4().hex[:20]}", old_base_id=old_base.id or 0,
                new_base_id=new_base.id or 0, options=chosen.to_json(), created_by=actor.name,
            )  # fmt: skip
            s.add(row)
            s.flush()
            for version, adapter, _ in self._served(s, old_base):
                s.add(self._new_item(s, row, version, adapter, deadline))
            audit.record(
                s, actor.name, "base.upgrade.start", f"base:{_label(old_base)}",
                after={"upgrade": row.id, "new_base": _label(new_base), **chosen.to_json()},
            )  # fmt: skip
        return self.get(row.id)

    @staticmethod
    def _refuse_running(s: Session, old_base: BaseModelRecord) -> None:
        running = s.exec(
            select(BaseUpgrade.id).where(
                BaseUpgrade.old_base_id == old_base.id, BaseUpgrade.state == RUNNING
            )
        ).first()
        if running is not None:
            raise Conflict(
                f"base upgrade {running} of {_label(old_base)} is running; follow it, or "
                "cancel it first"
            )

    @staticmethod
    def _new_item(
        s: Session,
        row: BaseUpgrade,
        version: AdapterVersion,
        adapter: Adapter,
        deadline: dt.datetime,
    ) -> BaseUpgradeItem:
        job, why = _source_job(s, version)
        return BaseUpgradeItem(
            upgrade_id=row.id, tenant_id=adapter.tenant_id, adapter_id=adapter.id or 0,
            adapter=adapter.name, old_version=version.number, old_version_id=version.id or 0,
            kind=TRAINED if job else UPLOADED, deadline=deadline, note="" if job else why,
        )  # fmt: skip

    # -- reading -------------------------------------------------------------------------

    def get(self, upgrade_id: str) -> UpgradeView:
        with self._read() as s:
            row = s.get(BaseUpgrade, upgrade_id)
            if row is None:
                raise _not_found(upgrade_id)
            return self._view(s, row)

    def list_upgrades(self) -> list[UpgradeView]:
        """Every upgrade, newest first."""
        with self._read() as s:
            query = select(BaseUpgrade).order_by(col(BaseUpgrade.created_at).desc())
            return [self._view(s, row) for row in s.exec(query).all()]

    def _view(self, s: Session, row: BaseUpgrade, tenant_id: int | None = None) -> UpgradeView:
        query = (
            select(BaseUpgradeItem, Tenant.name)
            .join(Tenant, col(Tenant.id) == BaseUpgradeItem.tenant_id)
            .where(BaseUpgradeItem.upgrade_id == row.id)
            .order_by(col(Tenant.name), col(BaseUpgradeItem.adapter))
        )
        if tenant_id is not None:
            query = query.where(BaseUpgradeItem.tenant_id == tenant_id)
        items = [(item, name) for item, name in s.exec(query).all()]
        old, new = (
            s.get_one(BaseModelRecord, row.old_base_id),
            s.get_one(BaseModelRecord, row.new_base_id),
        )
        return UpgradeView(row, _label(old), _label(new), items)

    def for_tenant(self, tenant_id: int) -> list[UpgradeView]:
        """The upgrades that move the tenant's adapters, with only the tenant's items."""
        with self._read() as s:
            # By id, not DISTINCT over the rows: PostgreSQL cannot compare JSON columns.
            mine = select(BaseUpgradeItem.upgrade_id).where(BaseUpgradeItem.tenant_id == tenant_id)
            query = select(BaseUpgrade).where(col(BaseUpgrade.id).in_(mine))
            rows = s.exec(query.order_by(col(BaseUpgrade.created_at).desc())).all()
            return [self._view(s, row, tenant_id) for row in rows]

    # -- the owner's choice and cancelling --------------------------------------------------

    def choose(
        self, tenant_id: int, upgrade_id: str, adapter: str, choice: str, actor: Actor
    ) -> UpgradeView:
        """The owner's answer where the new base alone meets the adapter's bar: ``retire``
        the adapter's old version, or ``retrain`` it on the new base anyway."""
        if choice not in CHOICES:
            raise InvalidRequest(f"choice must be 'retire' or 'retrain', not {choice!r}")
        with self._write() as s:
            item = s.exec(
                select(BaseUpgradeItem)
                .where(BaseUpgradeItem.upgrade_id == upgrade_id)
                .where(BaseUpgradeItem.tenant_id == tenant_id, BaseUpgradeItem.adapter == adapter)
                .with_for_update()
            ).first()
            if item is None:
                raise _no_item(adapter, upgrade_id)
            if item.state != MEETS_BAR:
                raise Conflict(
                    f"adapter {adapter!r} is {item.state} in upgrade {upgrade_id}; a choice is "
                    "asked only while the new base alone meets its bar (state meets_bar)"
                )
            item.choice = choice
            _item_event(s, item, actor.name, "chosen", f"the owner chose to {choice}")
        self._step(item.id or 0, utcnow())  # act on it now rather than at the next tick
        with self._read() as s:
            return self._view(s, s.get_one(BaseUpgrade, upgrade_id), tenant_id)

    def cancel(self, upgrade_id: str, actor: Actor) -> UpgradeView:
        """Stop a running upgrade: its unfinished items are cancelled, their jobs too, and a
        retrained version's canary is cleared (production stays on the old base)."""
        with self._write() as s:
            row = s.get(BaseUpgrade, upgrade_id, with_for_update=True)
            if row is None:
                raise _not_found(upgrade_id)
            if row.state != RUNNING:
                raise Conflict(f"base upgrade {upgrade_id} is {row.state}; only running ones stop")
            jobs = []
            for item in self._items(s, upgrade_id, lock=True):
                if item.state in FINAL:
                    continue
                jobs += [j for j in (item.eval_job, item.retrain_job) if j is not None]
                if item.state == IN_CANARY:
                    self._clear_alias(s, item, CANARY, actor.name)
                _item_event(s, item, actor.name, "cancelled", "the upgrade was cancelled",
                            CANCELLED_ITEM)  # fmt: skip
            self._finish(s, row, CANCELLED_UPGRADE, actor.name)
        self._cancel_jobs(jobs)
        return self.get(upgrade_id)

    def _cancel_jobs(self, job_ids: list[str]) -> None:
        store = JobStore(self.registry)
        for job_id in job_ids:
            job = store.get_job(None, job_id)
            if job.status not in FINISHED:
                store.cancel(job.tenant_id, job_id)

    @staticmethod
    def _items(s: Session, upgrade_id: str, lock: bool = False) -> list[BaseUpgradeItem]:
        query = select(BaseUpgradeItem).where(BaseUpgradeItem.upgrade_id == upgrade_id)
        query = query.order_by(col(BaseUpgradeItem.id))
        return list(s.exec(query.with_for_update() if lock else query).all())

    # -- advancing -----------------------------------------------------------------------

    def advance(self, upgrade_id: str, now: dt.datetime | None = None) -> list[UpgradeTransition]:
        """Take every step an upgrade's items can take now (one transaction each), and end
        the upgrade once every item is final; what happened, in order (empty: nothing)."""
        now = now or utcnow()
        with self._read() as s:
            row = s.get(BaseUpgrade, upgrade_id)
            if row is None:
                raise _not_found(upgrade_id)
            ids = [i.id or 0 for i in self._items(s, upgrade_id) if i.state not in FINAL]
        if row.state != RUNNING:
            return []
        moved: list[UpgradeTransition] = []
        for item_id in ids:
            while (step := self._step(item_id, now)) is not None:  # as far as it goes now
                moved.append(step)
        ended = self._maybe_finish(upgrade_id)
        return moved + ([ended] if ended else [])

    def advance_running(self, now: dt.datetime | None = None) -> list[UpgradeTransition]:
        """``advance`` every running upgrade (the workers' tick)."""
        with self._read() as s:
            ids = s.exec(select(BaseUpgrade.id).where(BaseUpgrade.state == RUNNING)).all()
        return [t for upgrade_id in ids for t in self.advance(upgrade_id, now)]

    def _step(self, item_id: int, now: dt.datetime) -> UpgradeTransition | None:
        with self._read() as s:
            seen = s.get_one(BaseUpgradeItem, item_id)
            row = s.get_one(BaseUpgrade, seen.upgrade_id)
        options = UpgradeOptions.from_json(row.options)
        health = self._canary_health(seen, options, now) if seen.state == IN_CANARY else None
        try:
            return self._step_in(item_id, seen.state, now, options, health)
        except RegistryError as exc:  # rolled back; the item says why, and stops there
            return self._step_failed(item_id, seen.state, f"{type(exc).__name__}: {exc}")

    def _step_in(
        self,
        item_id: int,
        seen: str,
        now: dt.datetime,
        options: UpgradeOptions,
        health: tuple[bool, str] | None,
    ) -> UpgradeTransition | None:
        with self._write() as s:
            item = s.get_one(BaseUpgradeItem, item_id, with_for_update=True)
            upgrade = s.get_one(BaseUpgrade, item.upgrade_id)
            if upgrade.state != RUNNING or item.state in FINAL or item.state != seen:
                return None  # another caller took this step first, or the upgrade ended
            step = _Step(s, upgrade, item, now, options, health)
            if not HANDLERS[item.state](self, step):
                return None
            return UpgradeTransition(item.adapter, _owner(s, item), item.state, item.note)

    def _step_failed(self, item_id: int, seen: str, why: str) -> UpgradeTransition | None:
        with self._write() as s:
            item = s.get_one(BaseUpgradeItem, item_id, with_for_update=True)
            if item.state != seen:
                return None
            _item_event(s, item, "upgrade", "failed", f"{seen}: {why}", FAILED)
            return UpgradeTransition(item.adapter, _owner(s, item), item.state, item.note)

    def _canary_health(
        self, item: BaseUpgradeItem, options: UpgradeOptions, now: dt.datetime
    ) -> tuple[bool, str] | None:
        """Whether the canary's online error rate is no worse than production's since the
        canary began (None: it has not run for ``canary_seconds`` yet)."""
        started = item.canary_started_at
        if started is None or item.new_version is None:
            return None
        if now < _aware(started) + dt.timedelta(seconds=options.canary_seconds):
            return None
        since = _aware(started)
        rates = [
            _error_rate(self.registry, item.tenant_id, item.adapter, number, since)
            for number in (item.new_version, item.old_version)
        ]
        new, old = rates
        if new is None:
            return True, "the canary served no counted requests; nothing says it is worse"
        if old is None or new <= old:
            shown = "no traffic" if old is None else f"{old:.2%}"
            return True, f"canary error rate {new:.2%} vs production's {shown}"
        return False, f"canary error rate {new:.2%} is worse than production's {old:.2%}"

    def _maybe_finish(self, upgrade_id: str) -> UpgradeTransition | None:
        with self._write() as s:
            row = s.get_one(BaseUpgrade, upgrade_id, with_for_update=True)
            items = self._items(s, upgrade_id)
            if row.state != RUNNING or any(i.state not in FINAL for i in items):
                return None
            self._finish(s, row, DONE, "upgrade")
            return UpgradeTransition(None, None, DONE, _summary(row.report or {}))

    def _finish(self, s: Session, row: BaseUpgrade, state: str, actor: str) -> None:
        s.flush()
        row.state, row.updated_at = state, utcnow()
        row.report = self._report(s, row)
        s.add(row)
        old = s.get_one(BaseModelRecord, row.old_base_id)
        action = "base.upgrade.done" if state == DONE else "base.upgrade.cancel"
        # A platform event every tenant reads: counts only, never other tenants' names.
        counts = {name: len(names) for name, names in row.report["items"].items()}
        after = {"upgrade": row.id, "state": state, "items": counts}
        audit.record(s, actor, action, f"base:{_label(old)}", after=after)

    def _report(self, s: Session, row: BaseUpgrade) -> dict[str, Any]:
        """What each item ended as, and every version still active on the old base."""
        ended: dict[str, list[str]] = {}
        for item in self._items(s, row.id):
            ended.setdefault(item.state, []).append(f"{_owner(s, item)}/{item.adapter}")
        query = (
            select(AdapterVersion, Adapter)
            .join(Adapter, col(Adapter.id) == AdapterVersion.adapter_id)
            .where(AdapterVersion.base_id == row.old_base_id, AdapterVersion.state != RETIRED)
            .order_by(col(Adapter.tenant_id), col(Adapter.name), col(AdapterVersion.number))
        )
        left = [
            f"{s.get_one(Tenant, a.tenant_id).name}/{a.name}@{v.number} ({v.state})"
            for v, a in s.exec(query).all()
        ]
        return {"items": ended, "left_on_old_base": left}

    # -- item handlers (each returns whether the item moved) --------------------------------

    def _planned(self, step: _Step) -> bool:
        item = step.item
        if item.kind == UPLOADED:
            note = f"{item.note}; act by {_iso(item.deadline)}, or it is "
            note += "retired" if step.options.uploaded_past_deadline == "retire" else "kept"
            note += " (push a version trained on the new base, and promote it)"
            _item_event(step.s, item, "upgrade", "action_required", note, AWAITING_OWNER)
            return True
        job = self._old_job(step.s, item)
        if job.method != "supervised":
            return self._retrain(step, f"{job.method} adapters are retrained without a "
                                       "base-alone evaluation")  # fmt: skip
        queued = self._queue(step, EVALUATION, "score the new base alone on the test split")
        item.eval_job = queued.id
        note = f"evaluation job {queued.id} scores the new base alone on the test split"
        _item_event(step.s, item, "upgrade", "evaluating", note, EVALUATING)
        return True

    def _evaluating(self, step: _Step) -> bool:
        item = step.item
        job = step.s.get_one(FineTuningJob, item.eval_job)
        if job.status not in FINISHED:
            return False
        if job.status != SUCCEEDED or not job.result:
            return self._retrain(step, f"the evaluation job {job.id} {job.status}; retraining")
        met, why = self._meets_bar(step, job.result)
        if not met:
            return self._retrain(step, why)
        note = f"{why}; the owner may retire the adapter or retrain it, by {_iso(item.deadline)}"
        _item_event(step.s, item, "upgrade", "action_required", note, MEETS_BAR)
        return True

    def _meets_bar(self, step: _Step, result: dict[str, Any]) -> tuple[bool, str]:
        """Whether the base alone, as the evaluation job measured it, is at most the
        margin worse than the old version and meets the adapter's gates' minimums."""
        item, margin = step.item, step.options.bar_margin
        metric = item.metric = str(result.get("decides") or "loss")
        base_metrics: dict[str, float] = result.get("metrics", {}).get("base", {})
        base = base_metrics.get(metric)
        old = latest_value(step.s, item.old_version_id, TEST_SUITE, metric)
        item.scores = {**item.scores, "metric": metric, "old": old, "base": base}
        if base is None or old is None:
            return False, f"no {metric} to compare the base alone with; retraining"
        higher = metric != "loss"
        bar = old - margin if higher else old + margin
        item.scores = {**item.scores, "bar": bar}
        misses = [f"{metric} {base:g} vs the bar {bar:g} (old {old:g}, margin {margin:g})"]
        if (base >= bar) if higher else (base <= bar):
            misses = []
        misses += _gate_minimums(step.s, item.adapter_id, base_metrics)
        if misses:
            return False, "the new base alone misses the bar: " + "; ".join(misses)
        return True, f"the new base alone meets the bar: {metric} {base:g} vs {bar:g}"

    def _meets_bar_state(self, step: _Step) -> bool:
        item = step.item
        choice, why = item.choice, "the owner chose to"
        if choice is None and item.deadline is not None and step.now >= _aware(item.deadline):
            choice, why = step.options.unanswered_past_deadline, "no choice by the deadline: "
            why += "the operator's default,"
        if choice is None:
            return False
        if choice == "retrain":
            return self._retrain(step, f"{why} retrain")
        return self._retire_old(
            step, RETIRED_ITEM, f"{why} retire (the new base alone meets its bar)"
        )

    def _awaiting(self, step: _Step) -> bool:
        item = step.item
        moved = self._owner_moved(step)
        if moved is not None:  # the owner pushed a version for the new base and promoted it
            item.new_version = moved
            return self._retire_old(step, MIGRATED, f"the owner promoted version {moved} on "
                                    "the new base")  # fmt: skip
        if item.deadline is None or step.now < _aware(item.deadline):
            return False
        if step.options.uploaded_past_deadline == "keep":
            note = "past the deadline: kept serving on the old base"
            _item_event(step.s, item, "upgrade", "kept", note, KEPT)
            return True
        return self._retire_old(step, RETIRED_ITEM, "past the deadline: retired")

    def _owner_moved(self, step: _Step) -> int | None:
        """The production version's number when it is pinned to the new base now."""
        production = lifecycle.aliases(step.s, step.item.adapter_id).get(PRODUCTION)
        version = None if production is None else step.s.get(AdapterVersion, production.version_id)
        if version is None or version.base_id != step.upgrade.new_base_id:
            return None
        return version.number

    def _retraining(self, step: _Step) -> bool:
        item, s = step.item, step.s
        job = s.get_one(FineTuningJob, item.retrain_job)
        if job.status not in FINISHED:
            return False
        version = s.exec(
            select(AdapterVersion).where(AdapterVersion.training_job == job.id)
        ).first()
        if job.status != SUCCEEDED or version is None:
            reason = (job.error or {}).get("message") or job.status
            return self._fail(step, f"the retraining job {job.id} {job.status}: {reason}")
        item.new_version = version.number
        failures = self._compare(step, version)
        if failures:
            return self._fail(step, f"version {version.number} fails: " + "; ".join(failures))
        adapter = self.registry._adapter(s, item.tenant_id, item.adapter, lock=True)
        change = _change(s, item, "upgrade")
        lifecycle.canary(s, adapter, version, step.options.canary_weight, change)
        item.canary_started_at = step.now
        note = (f"version {version.number} passed; canary at {step.options.canary_weight:.0%} "
                f"for {step.options.canary_seconds:g} s")  # fmt: skip
        _item_event(s, item, "upgrade", "retrained", note, IN_CANARY)
        return True

    def _compare(self, step: _Step, version: AdapterVersion) -> list[str]:
        """The gates the new version fails (with no gates: whether it is no worse than the
        old version on the deciding metric, by the margin)."""
        item, s = step.item, step.s
        adapter = s.get_one(Adapter, item.adapter_id)
        gated = s.exec(select(PromotionGate).where(PromotionGate.adapter_id == adapter.id)).first()
        metric = item.metric or _decider(self._old_job(s, item).result or {})
        item.metric = metric
        new = latest_value(s, version.id or 0, TEST_SUITE, metric)
        old = latest_value(s, item.old_version_id, TEST_SUITE, metric)
        item.scores = {**item.scores, "metric": metric, "old": old, "new": new}
        if gated is not None:
            return self.registry._gate_failures(s, adapter, version)
        if new is None or old is None:
            return [] if old is None else [f"{TEST_SUITE}/{metric}: no result; evaluate it"]
        margin = step.options.bar_margin
        worse = new < old - margin if metric != "loss" else new > old + margin
        if not worse:
            return []
        return [f"{TEST_SUITE}/{metric} {new:g} is worse than the old {old:g} by over {margin:g}"]

    def _canary(self, step: _Step) -> bool:
        if step.health is None:
            return False
        item, s = step.item, step.s
        healthy, why = step.health
        adapter = self.registry._adapter(s, item.tenant_id, item.adapter, lock=True)
        self._clear_alias(s, item, CANARY, "upgrade")
        if not healthy:
            return self._fail(step, f"{why}; the canary was rolled back")
        version = self.registry._version(s, adapter, item.new_version or 0)
        self.registry.promote_in(s, adapter, version, Actor(f"upgrade:{item.upgrade_id}", True))
        _item_event(s, item, "upgrade", "promoted", f"{why}; version {version.number} promoted",
                    PROMOTED)  # fmt: skip
        return True

    def _promoted(self, step: _Step) -> bool:
        item = step.item
        grace = dt.timedelta(seconds=step.options.retire_grace_seconds)
        if grace and step.now < _aware(item.updated_at) + grace:
            return False
        note = f"migrated to version {item.new_version} on the new base"
        return self._retire_old(step, MIGRATED, note)

    # -- helpers ---------------------------------------------------------------------------

    def _retire_old(self, step: _Step, state: str, note: str) -> bool:
        """Retire the adapter's versions on the old base, clearing the aliases on them."""
        item, s = step.item, step.s
        adapter = self.registry._adapter(s, item.tenant_id, item.adapter, lock=True)
        change = _change(s, item, "upgrade")
        versions = s.exec(
            select(AdapterVersion).where(
                AdapterVersion.adapter_id == adapter.id,
                AdapterVersion.base_id == step.upgrade.old_base_id,
                AdapterVersion.state != RETIRED,
            )
        ).all()
        ids = {v.id for v in versions}
        for alias in lifecycle.aliases(s, adapter.id or 0).values():
            if alias.version_id in ids:
                # The old base is going away: what points there now serves nothing new.
                action = _CLEAR_ACTIONS.get(alias.name, DELETE_ACTION)
                lifecycle._clear(s, adapter, alias.name, change, action)
        retired = []
        for version in versions:
            lifecycle.set_state(s, adapter, version, RETIRED, change)
            retired.append(version.number)
        item.scores = {**item.scores, "retired_versions": retired}
        _item_event(s, item, "upgrade", "retired", note, state)
        return True

    def _clear_alias(self, s: Session, item: BaseUpgradeItem, name: str, actor: str) -> None:
        adapter = self.registry._adapter(s, item.tenant_id, item.adapter, lock=True)
        if name in lifecycle.aliases(s, adapter.id or 0):
            lifecycle._clear(s, adapter, name, _change(s, item, actor), _CLEAR_ACTIONS[name])

    def _fail(self, step: _Step, note: str) -> bool:
        _item_event(step.s, step.item, "upgrade", "failed", note, FAILED)
        return True

    def _retrain(self, step: _Step, why: str) -> bool:
        job = self._queue(step, self._old_job(step.s, step.item).method, "retrain on the new base")
        step.item.retrain_job = job.id
        note = f"{why}; retraining job {job.id} on the new base"
        _item_event(step.s, step.item, "upgrade", "retraining", note, RETRAINING)
        return True

    @staticmethod
    def _old_job(s: Session, item: BaseUpgradeItem) -> FineTuningJob:
        version = s.get_one(AdapterVersion, item.old_version_id)
        return s.get_one(FineTuningJob, version.training_job)

    def _queue(self, step: _Step, method: str, what: str) -> FineTuningJob:
        """An ordinary job on the new base copying the old version's job (from scratch)."""
        s, old = step.s, self._old_job(step.s, step.item)
        base = s.get_one(BaseModelRecord, step.upgrade.new_base_id)
        job = FineTuningJob(
            id=new_id("ftjob"), tenant_id=old.tenant_id, model=base.name,
            base_fingerprint=base.fingerprint, training_file=old.training_file,
            validation_file=old.validation_file, method=method,
            hyperparameters=dict(old.hyperparameters), seed=old.seed,
            json_schema=old.json_schema, answer_regex=old.answer_regex,
            adapter_name=step.item.adapter, dataset_version_id=old.dataset_version_id,
        )  # fmt: skip
        s.add(job)
        s.flush()
        message = f"Created by base upgrade {step.upgrade.id} to {what} (as job {old.id} did)"
        s.add(FineTuningEvent(job_id=job.id, message=message))
        return job


HANDLERS: dict[str, Callable[[UpgradeStore, _Step], bool]] = {
    PLANNED: UpgradeStore._planned,
    EVALUATING: UpgradeStore._evaluating,
    MEETS_BAR: UpgradeStore._meets_bar_state,
    AWAITING_OWNER: UpgradeStore._awaiting,
    RETRAINING: UpgradeStore._retraining,
    IN_CANARY: UpgradeStore._canary,
    PROMOTED: UpgradeStore._promoted,
}
_CLEAR_ACTIONS = {
    CANARY: "adapter.canary_clear",
    SHADOW: "adapter.shadow_clear",
    PRODUCTION: "adapter.production_clear",
}


def _label(base: BaseModelRecord) -> str:
    return f"{base.name}@{base.revision}" if base.revision else base.name


def _owner(s: Session, item: BaseUpgradeItem) -> str:
    return s.get_one(Tenant, item.tenant_id).name


def _change(s: Session, item: BaseUpgradeItem, actor: str) -> lifecycle.Change:
    subject = f"adapter:{_owner(s, item)}/{item.adapter}"
    return lifecycle.Change(f"{actor}:{item.upgrade_id}", subject, item.tenant_id)


def _item_event(
    s: Session, item: BaseUpgradeItem, actor: str, event: str, note: str, state: str | None = None
) -> None:
    """Move the item to ``state`` (if given) and write ``adapter.upgrade.<event>``."""
    before = item.state
    item.state, item.note, item.updated_at = state or item.state, note[:2048], utcnow()
    s.add(item)
    audit.record(
        s, f"{actor}:{item.upgrade_id}" if actor == "upgrade" else actor,
        f"adapter.upgrade.{event}", f"adapter:{_owner(s, item)}/{item.adapter}@{item.old_version}",
        tenant_id=item.tenant_id, before={"state": before},
        after={"upgrade": item.upgrade_id, "state": item.state, "kind": item.kind,
               "version": item.old_version, "new_version": item.new_version,
               "deadline": _iso(item.deadline), "scores": item.scores, "note": item.note},
    )  # fmt: skip


def _source_job(s: Session, version: AdapterVersion) -> tuple[FineTuningJob | None, str]:
    """The succeeded job a version came from, if it can be run again; else why not."""
    if version.training_job is None or version.composition is not None:
        return None, "uploaded (no training job to retrain from)"
    job = s.get(FineTuningJob, version.training_job)
    if job is None or job.status != SUCCEEDED:
        return None, f"its training job {version.training_job} is not on record"
    file = s.get(TrainingFile, job.training_file)
    if file is None or file.deleted_at is not None:
        return None, f"its training file {job.training_file} was deleted"
    return job, ""


def _dataset_label(s: Session, job: FineTuningJob) -> str | None:
    from registry.datasets import Dataset, DatasetVersion

    if job.dataset_version_id is None:
        return None
    found = s.exec(
        select(Dataset.name, DatasetVersion.number)
        .join(Dataset, col(Dataset.id) == DatasetVersion.dataset_id)
        .where(DatasetVersion.id == job.dataset_version_id)
    ).first()
    return None if found is None else f"dataset {found[0]}@{found[1]}"


def _decider(result: dict[str, Any]) -> str:
    """The metric that decided the old job's promotion (``training.promotion``)."""
    summary = str((result.get("promotion") or {}).get("summary") or "")
    return "exact_match" if summary.startswith("exact match") else "loss"


def _gate_minimums(s: Session, adapter_id: int, base: dict[str, float]) -> list[str]:
    """The adapter's gates on the test suite whose minimum the base alone misses."""
    misses = []
    gates = s.exec(select(PromotionGate).where(PromotionGate.adapter_id == adapter_id)).all()
    for gate in gates:
        value = base.get(gate.metric)
        if gate.suite != TEST_SUITE or gate.min_value is None or value is None:
            continue
        if (value < gate.min_value) if gate.higher_is_better else (value > gate.min_value):
            misses.append(f"gate {gate.suite}/{gate.metric}: {value:g} misses {gate.min_value:g}")
    return misses


def _error_rate(
    registry: Registry, tenant_id: int, adapter: str, version: int, since: dt.datetime
) -> float | None:
    measured = online_metrics(registry, tenant_id, adapter, version, since)
    return next((s.value for s in measured.scores if s.metric == ERROR_RATE), None)


def _summary(report: dict[str, Any]) -> str:
    items = report.get("items", {})
    parts = [f"{state}: {', '.join(names)}" for state, names in sorted(items.items())]
    left = report.get("left_on_old_base") or []
    parts.append(f"left on the old base: {', '.join(left) if left else 'nothing'}")
    return "; ".join(parts)
