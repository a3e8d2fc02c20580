"""Retraining: adapters that keep learning from their dataset and their users' feedback.

A tenant's adapter may have one retraining policy (``retraining_policies``): a dataset,
a trigger (every ``every_seconds``, and/or after ``after_feedback`` new feedback items on
completions the adapter served), where training starts (``production``: the production
version's weights; ``scratch``: a fresh LoRA) and a job template (method, seed,
hyperparameters, JSON schema). A run adds a version to the dataset from the adapter's
liked and corrected completions (``DatasetStore.add_from_completions``), then queues an
ordinary fine-tuning job on the dataset's latest version, into the same adapter. A run
whose dataset version is the one the last run queued a job on queues nothing and says so.

``due(now)`` claims the policies whose trigger fired, in one transaction that moves their
clock on (``last_run_at``, ``next_run_at``, ``last_feedback_seq``): safe with any number
of workers calling it, as PostgreSQL row locks are taken ``FOR UPDATE SKIP LOCKED`` (like
the job queue) and SQLite serialises writers. A claimed policy whose run then fails waits
for its next trigger; ``record_run`` stores each run's outcome.

Also here: what a job's lineage columns name (``job_links``), and the adapter version a
job continues (``init_version``), for the API and the worker.

Everything is tenant-scoped: a foreign adapter answers exactly like an unknown one.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import JSON, DateTime, func, or_
from sqlmodel import Field, Session, SQLModel, col, select

from registry import audit, lifecycle
from registry.captures import NUL, Feedback, StoredCompletion
from registry.dataset_sources import CompletionFilter
from registry.datasets import Dataset, DatasetStore, DatasetVersion
from registry.errors import InvalidRequest, NotFound, RegistryError
from registry.jobs import FineTuningJob, JobStore, new_id
from registry.models import (
    PRODUCTION,
    Adapter,
    AdapterVersion,
    BaseModelRecord,
    timestamp_column,
    utcnow,
)
from registry.registry import Registry
from registry.store import Store
from registry.values import Actor, VersionBlob

log = logging.getLogger("loraplex.retraining")

StartFrom = Literal["production", "scratch"]
START_FROM = ("production", "scratch")
MIN_EVERY_SECONDS = 1
MAX_EVERY_SECONDS = 10 * 366 * 86400
"""Ten years: longer periods are a mistake (and would overflow the clock's arithmetic)."""
MAX_AFTER_FEEDBACK = 10**9
MAX_SEED = 2**31 - 1
CLAIM_BATCH = 200
"""Policies one ``due`` call examines (the oldest-due first); the rest wait for the next."""


class RetrainingPolicy(SQLModel, table=True):
    __tablename__ = "retraining_policies"

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenants.id", index=True)
    adapter_id: int = Field(foreign_key="adapters.id", unique=True)
    dataset_id: int = Field(foreign_key="datasets.id", index=True)
    every_seconds: int | None = None
    after_feedback: int | None = None
    start_from: str = Field(default="production", max_length=16)
    method: str = Field(default="supervised", max_length=16)
    seed: int = 0
    hyperparameters: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    json_schema: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    enabled: bool = True
    next_run_at: dt.datetime | None = Field(
        default=None, sa_type=DateTime(timezone=True), index=True
    )
    """When the timed trigger fires next (None: no timed trigger)."""
    last_run_at: dt.datetime | None = timestamp_column(nullable=True)
    last_feedback_seq: int = 0
    """The newest feedback (``Feedback.seq``) the last run, or the policy's creation, saw."""
    last_job: str | None = Field(default=None, foreign_key="fine_tuning_jobs.id", max_length=40)
    last_dataset_version_id: int | None = Field(default=None, foreign_key="dataset_versions.id")
    """The dataset version the last queued job trains on."""
    last_outcome: str = Field(default="", max_length=1024)
    created_at: dt.datetime = timestamp_column()
    updated_at: dt.datetime = timestamp_column()


@dataclass(frozen=True)
class PolicySpec:
    """What a tenant sets: the dataset, the triggers, the start and the job template."""

    dataset: str
    every_seconds: int | None = None
    after_feedback: int | None = None
    start_from: StartFrom = "production"
    method: Literal["supervised", "dpo"] = "supervised"
    seed: int = 0
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    json_schema: dict[str, Any] | None = None
    enabled: bool = True


@dataclass(frozen=True)
class NamedPolicy:
    """A stored policy with the names its ids stand for."""

    row: RetrainingPolicy
    adapter: str
    dataset: str
    last_dataset_version: int | None
    """The number of ``row.last_dataset_version_id``."""


@dataclass(frozen=True)
class RunOutcome:
    """What one run did: the job it queued (None: skipped, ``message`` says why)."""

    adapter: str
    job: FineTuningJob | None
    message: str
    dataset_version: DatasetVersion | None = None


@dataclass(frozen=True)
class JobLinks:
    """What a job's lineage columns name: (dataset, version) and (adapter, version)."""

    dataset_version: tuple[str, int] | None
    init_version: tuple[str, int] | None


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


def _policy_not_found(adapter: str) -> NotFound:
    return NotFound(
        f"adapter {adapter!r} has no retraining policy (or does not exist); set one with "
        f"PUT /v1/fine_tuning/policies/{adapter}"
    )


def check_spec(spec: PolicySpec) -> None:
    """Refuse a policy that could never run, or would run without bound."""
    problems = []
    if spec.every_seconds is None and spec.after_feedback is None:
        problems.append("set every_seconds, after_feedback or both: a policy needs a trigger")
    every, after = spec.every_seconds, spec.after_feedback
    if every is not None and not MIN_EVERY_SECONDS <= every <= MAX_EVERY_SECONDS:
        problems.append(f"every_seconds must be from {MIN_EVERY_SECONDS} to {MAX_EVERY_SECONDS}")
    if after is not None and not 1 <= after <= MAX_AFTER_FEEDBACK:
        problems.append(
            f"after_feedback must be from 1 to {MAX_AFTER_FEEDBACK} (new feedback items)"
        )
    if not 0 <= spec.seed <= MAX_SEED:
        problems.append(f"seed must be from 0 to {MAX_SEED}")
    if spec.start_from not in START_FROM:
        problems.append(f"start_from must be 'production' or 'scratch', not {spec.start_from!r}")
    if spec.method not in ("supervised", "dpo"):
        problems.append(f"method must be 'supervised' or 'dpo', not {spec.method!r}")
    if problems:
        raise InvalidRequest("; ".join(problems))


def init_version(registry: Registry, version_id: int) -> tuple[str, VersionBlob]:
    """The adapter name and blob of the version a job continues (whatever its state now:
    a job keeps the start it was created with)."""
    with Session(registry.database, expire_on_commit=False) as s:
        row = s.exec(
            select(AdapterVersion, Adapter.name, BaseModelRecord)
            .join(Adapter, col(Adapter.id) == AdapterVersion.adapter_id)
            .join(BaseModelRecord, col(BaseModelRecord.id) == AdapterVersion.base_id)
            .where(AdapterVersion.id == version_id)
        ).first()
    if row is None:
        raise NotFound(f"adapter version id {version_id} does not exist; create the job again")
    version, name, base = row
    return name, VersionBlob(
        version, base, version.blob_key, version.blob_sha256, version.size_bytes
    )


def job_links(registry: Registry, job: FineTuningJob) -> JobLinks:
    """(dataset, version) of the job's dataset version and (adapter, version) it continues."""
    dataset = init = None
    with Session(registry.database) as s:
        if job.dataset_version_id is not None:
            found = s.exec(
                select(Dataset.name, DatasetVersion.number)
                .join(Dataset, col(Dataset.id) == DatasetVersion.dataset_id)
                .where(DatasetVersion.id == job.dataset_version_id)
            ).first()
            dataset = None if found is None else (found[0], found[1])
        if job.init_version_id is not None:
            started = s.exec(
                select(Adapter.name, AdapterVersion.number)
                .join(Adapter, col(Adapter.id) == AdapterVersion.adapter_id)
                .where(AdapterVersion.id == job.init_version_id)
            ).first()
            init = None if started is None else (started[0], started[1])
    return JobLinks(dataset, init)


class RetrainingStore(Store):
    """Retraining policies, their claims and their runs, on the registry's database."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs, self.registry = jobs, jobs.registry
        self.database, self.blobs, self.limits = jobs.database, jobs.blobs, jobs.limits
        self.datasets = DatasetStore(jobs)

    # -- policies ----------------------------------------------------------------------

    def set_policy(
        self, tenant_id: int, adapter: str, spec: PolicySpec, actor: Actor
    ) -> NamedPolicy:
        """Create or replace the adapter's policy (its run history stays)."""
        check_spec(spec)
        with self._write() as s:
            owner = self._adapter(s, tenant_id, adapter)
            dataset = self._dataset(s, tenant_id, spec.dataset)
            row = self._row(s, owner, lock=True)
            before = None if row is None else _summary(row)
            now = utcnow()
            if row is None:
                row = RetrainingPolicy(
                    tenant_id=tenant_id,
                    adapter_id=owner.id,  # type: ignore[arg-type]
                    dataset_id=dataset.id,  # type: ignore[arg-type]
                    last_feedback_seq=self._feedback(s, tenant_id, adapter, 0)[1],
                )
            self._apply(row, spec, dataset, now)
            s.add(row)
            s.flush()
            audit.record(
                s, actor.name, "retraining.set", f"adapter:{tenant_id}/{adapter}",
                tenant_id=tenant_id, before=before, after=_summary(row),
            )  # fmt: skip
        return self.get_policy(tenant_id, adapter)

    @staticmethod
    def _apply(row: RetrainingPolicy, spec: PolicySpec, dataset: Dataset, now: dt.datetime) -> None:
        row.dataset_id = dataset.id  # type: ignore[assignment]
        row.every_seconds, row.after_feedback = spec.every_seconds, spec.after_feedback
        row.start_from, row.method, row.seed = spec.start_from, spec.method, spec.seed
        row.hyperparameters, row.json_schema = dict(spec.hyperparameters), spec.json_schema
        row.enabled, row.updated_at = spec.enabled, now
        # The timed trigger counts from the last run (or from now, for a first one).
        start = _aware(row.last_run_at) or now
        every = spec.every_seconds
        row.next_run_at = None if every is None else start + dt.timedelta(seconds=every)

    def get_policy(self, tenant_id: int, adapter: str) -> NamedPolicy:
        with self._read() as s:
            row = self._row(s, self._adapter(s, tenant_id, adapter, policy=True))
            if row is None:
                raise _policy_not_found(adapter)
            return self._policy(s, row, adapter)

    def list_policies(self, tenant_id: int) -> list[NamedPolicy]:
        with self._read() as s:
            query = (
                select(RetrainingPolicy, Adapter.name)
                .join(Adapter, col(Adapter.id) == RetrainingPolicy.adapter_id)
                .where(RetrainingPolicy.tenant_id == tenant_id)
                .order_by(col(Adapter.name))
            )
            return [self._policy(s, row, name) for row, name in s.exec(query).all()]

    def delete_policy(self, tenant_id: int, adapter: str, actor: Actor) -> None:
        with self._write() as s:
            row = self._row(s, self._adapter(s, tenant_id, adapter, policy=True), lock=True)
            if row is None:
                raise _policy_not_found(adapter)
            before = _summary(row)
            s.delete(row)
            audit.record(
                s, actor.name, "retraining.delete", f"adapter:{tenant_id}/{adapter}",
                tenant_id=tenant_id, before=before,
            )  # fmt: skip

    def _adapter(self, s: Session, tenant_id: int, name: str, policy: bool = False) -> Adapter:
        query = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
        # No name holds a NUL, and PostgreSQL refuses them in queries.
        adapter = None if NUL in name else s.exec(query).first()
        if adapter is None:
            # The same words for foreign and unknown adapters.
            if policy:
                raise _policy_not_found(name)
            raise NotFound(f"adapter {name!r} does not exist; list your adapters to see the names")
        return adapter

    def _dataset(self, s: Session, tenant_id: int, name: str) -> Dataset:
        query = select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.name == name)
        dataset = None if NUL in name else s.exec(query).first()
        if dataset is None:
            raise NotFound(f"dataset {name!r} does not exist; create it first (or list datasets)")
        return dataset

    @staticmethod
    def _row(s: Session, adapter: Adapter, lock: bool = False) -> RetrainingPolicy | None:
        query = select(RetrainingPolicy).where(RetrainingPolicy.adapter_id == adapter.id)
        return s.exec(query.with_for_update() if lock else query).first()

    @staticmethod
    def _policy(s: Session, row: RetrainingPolicy, adapter: str) -> NamedPolicy:
        dataset = s.get_one(Dataset, row.dataset_id).name
        version = (
            None
            if row.last_dataset_version_id is None
            else s.get_one(DatasetVersion, row.last_dataset_version_id).number
        )
        return NamedPolicy(row, adapter, dataset, version)

    @staticmethod
    def _feedback(s: Session, tenant_id: int, adapter: str, after: int) -> tuple[int, int]:
        """(how many, newest seq) of the feedback after ``after`` on the adapter's answers."""
        count, newest = s.exec(
            select(func.count(), func.max(Feedback.seq))
            .select_from(Feedback)
            .join(StoredCompletion, col(StoredCompletion.id) == Feedback.completion)
            .where(
                Feedback.tenant_id == tenant_id,
                StoredCompletion.tenant_id == tenant_id,
                StoredCompletion.adapter == adapter,
                col(Feedback.seq) > after,
            )
        ).one()
        return int(count), int(newest or after)

    # -- claims and runs ---------------------------------------------------------------

    def due(self, now: dt.datetime | None = None) -> list[NamedPolicy]:
        """Claim the enabled policies whose trigger fired, moving their clocks on."""
        now = now or utcnow()
        claimed = []
        with self._write() as s:
            query = (
                select(RetrainingPolicy, Adapter.name)
                .join(Adapter, col(Adapter.id) == RetrainingPolicy.adapter_id)
                .where(
                    col(RetrainingPolicy.enabled),
                    or_(
                        col(RetrainingPolicy.next_run_at) <= now,
                        col(RetrainingPolicy.after_feedback).is_not(None),
                    ),
                )
                # Timed policies first, the longest overdue first; feedback-only ones after,
                # the least recently run first (so none waits behind the others for ever).
                .order_by(
                    col(RetrainingPolicy.next_run_at).asc().nulls_last(),
                    col(RetrainingPolicy.last_run_at).asc().nulls_first(),
                    col(RetrainingPolicy.id),
                )
                .limit(CLAIM_BATCH)
            )
            if self.database.dialect.name == "postgresql":
                # Another worker's claim holds its rows; skip them rather than wait.
                query = query.with_for_update(skip_locked=True, of=RetrainingPolicy)
            # SQLite: this write transaction began IMMEDIATE, so no other writer runs until commit.
            for row, adapter in s.exec(query).all():
                if self._claim(s, row, adapter, now):
                    claimed.append(self._policy(s, row, adapter))
        return claimed

    def _claim(self, s: Session, row: RetrainingPolicy, adapter: str, now: dt.datetime) -> bool:
        count, newest = self._feedback(s, row.tenant_id, adapter, row.last_feedback_seq)
        next_run = _aware(row.next_run_at)
        timed = next_run is not None and next_run <= now
        fed = row.after_feedback is not None and count >= row.after_feedback
        if not (timed or fed):
            return False
        self._advance(row, now, newest)
        s.add(row)
        return True

    @staticmethod
    def _advance(row: RetrainingPolicy, now: dt.datetime, newest: int) -> None:
        row.last_run_at, row.last_feedback_seq = now, max(newest, row.last_feedback_seq)
        every = row.every_seconds
        row.next_run_at = None if every is None else now + dt.timedelta(seconds=every)

    def claim_now(
        self, tenant_id: int, adapter: str, now: dt.datetime | None = None
    ) -> NamedPolicy:
        """Claim the adapter's policy whatever its trigger says (``run-now``; disabled too)."""
        now = now or utcnow()
        with self._write() as s:
            row = self._row(s, self._adapter(s, tenant_id, adapter, policy=True), lock=True)
            if row is None:
                raise _policy_not_found(adapter)
            newest = self._feedback(s, tenant_id, adapter, row.last_feedback_seq)[1]
            self._advance(row, now, newest)
            s.add(row)
            return self._policy(s, row, adapter)

    def run(self, policy: NamedPolicy) -> RunOutcome:
        """Run a claimed policy: a dataset version from the feedback, then a job (or a skip)."""
        row, actor = policy.row, Actor(f"retraining:{policy.adapter}")
        wanted = CompletionFilter(adapter=policy.adapter, method=row.method)  # type: ignore[arg-type]
        added, new = self.datasets.add_from_completions(
            row.tenant_id, policy.dataset, wanted, actor
        )
        latest = self.datasets.get_version(row.tenant_id, policy.dataset)
        where = f"dataset {policy.dataset!r} version {latest.number}"
        if latest.id == row.last_dataset_version_id:
            return RunOutcome(
                policy.adapter, None,
                f"Skipped: {where} is unchanged since the last run (job {row.last_job}); no "
                "new feedback made examples. Add data or feedback, or wait for the next run.",
                latest,
            )  # fmt: skip
        if latest.example_count == 0:
            return RunOutcome(
                policy.adapter, None, f"Skipped: {where} holds no examples yet", latest
            )
        job, start = self._queue(policy, latest)
        made = f"made {where} from feedback" if new and added.id == latest.id else f"on {where}"
        message = f"Queued job {job.id} {made}, starting from {start}"
        self.jobs.add_event(
            job.id, f"Created by the retraining policy of {policy.adapter}: {message}"
        )
        return RunOutcome(policy.adapter, job, message, latest)

    def _queue(self, policy: NamedPolicy, latest: DatasetVersion) -> tuple[FineTuningJob, str]:
        row = policy.row
        with self._read() as s:
            adapter = s.get_one(Adapter, row.adapter_id)
            production = lifecycle.aliases(s, row.adapter_id).get(PRODUCTION)
            newest = s.exec(
                select(AdapterVersion)
                .where(AdapterVersion.adapter_id == row.adapter_id)
                .order_by(col(AdapterVersion.number).desc())
            ).first()
            init = None
            if row.start_from == "production" and production is not None:
                init = s.get_one(AdapterVersion, production.version_id)
            pinned = init or newest
            if pinned is None:
                raise InvalidRequest(f"adapter {adapter.name!r} has no version to train on top of")
            base = s.get_one(BaseModelRecord, pinned.base_id)
        start = "a fresh LoRA" if init is None else f"version {init.number}'s weights"
        if row.start_from == "production" and init is None:
            start += " (the adapter has no production version)"
        job = FineTuningJob(
            id=new_id("ftjob"),
            tenant_id=row.tenant_id,
            model=adapter.name if init is not None else base.name,
            base_fingerprint=base.fingerprint,
            training_file=latest.file_id,
            method=row.method,
            hyperparameters=dict(row.hyperparameters),
            seed=row.seed,
            json_schema=row.json_schema,
            adapter_name=adapter.name,
            dataset_version_id=latest.id,
            init_version_id=None if init is None else init.id,
        )
        return self.jobs.create_job(job), start

    def record_run(self, policy: NamedPolicy, outcome: RunOutcome) -> None:
        """Store a run's outcome on its policy (a policy deleted meanwhile is left gone)."""
        with self._write() as s:
            row = s.get(RetrainingPolicy, policy.row.id, with_for_update=True)
            if row is None:
                return
            row.last_outcome = outcome.message[:1024]
            if outcome.job is not None:
                row.last_job = outcome.job.id
                row.last_dataset_version_id = outcome.job.dataset_version_id
            s.add(row)

    def tick(self, now: dt.datetime | None = None) -> list[RunOutcome]:
        """Claim and run every due policy; a policy whose run fails is logged and recorded."""
        outcomes = []
        for policy in self.due(now):
            outcomes.append(self.run_claimed(policy))
        return outcomes

    def run_claimed(self, policy: NamedPolicy) -> RunOutcome:
        try:
            outcome = self.run(policy)
        except RegistryError as exc:
            outcome = RunOutcome(policy.adapter, None, f"Failed: {exc}")
        log.info("retraining %s: %s", policy.adapter, outcome.message)
        self.record_run(policy, outcome)
        return outcome


def _summary(row: RetrainingPolicy) -> dict[str, Any]:
    return {"dataset_id": row.dataset_id, **policy_settings(row)}


def policy_settings(row: RetrainingPolicy) -> dict[str, Any]:
    """A policy's triggers and job template, as the audit log, the API and the CLI show them."""
    return {
        "every_seconds": row.every_seconds,
        "after_feedback": row.after_feedback,
        "start_from": row.start_from,
        "method": row.method,
        "seed": row.seed,
        "hyperparameters": row.hyperparameters,
        "enabled": row.enabled,
    }
