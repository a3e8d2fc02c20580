"""Fine-tuning files and jobs: the tables, and the queue workers claim jobs from.

A job moves ``queued -> running -> succeeded | failed | cancelled`` (never OpenAI's
``validating_files``: its files are checked before it is created). Its owner may pause a
queued or running job (``paused``: never claimed; a running one's worker stops at its next
heartbeat, keeping nothing) and resume it (``queued`` again: training restarts from the
start, as no mid-training state is kept). Workers claim the oldest
queued job with row locking that is safe with many workers: ``SELECT ... FOR UPDATE
SKIP LOCKED`` on PostgreSQL; on SQLite one conditional ``UPDATE`` inside a write
transaction (SQLite serialises writers, so two workers can't win the same row). A
running job's worker heartbeats; a reaper returns jobs whose heartbeat went stale to the
queue, or fails them once they have used up their attempts.

A job's result lands in one transaction (``complete``): its version registered, its eval
results, its promotion and its success, and only while the completing worker still holds
the job. A worker killed at any moment leaves all of it or none of it (at most a stored
blob, which staging the same weights again reuses), and a worker whose job was reaped
under it writes nothing.

Everything is tenant-scoped: a foreign id raises the same ``NotFound`` as an unknown one.
Uploaded file bytes live in the registry's blob store under ``files/<id>``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, text
from sqlmodel import Field, Session, SQLModel, col, select

from registry import audit, lifecycle
from registry.adapter_names import check_adapter_name
from registry.errors import GateFailed, InvalidRequest, NotFound
from registry.models import (
    PRODUCTION,
    Adapter,
    AdapterVersion,
    EvalResult,
    PromotionGate,
    timestamp_column,
    utcnow,
)
from registry.registry import Registry, Score, StagedVersion
from registry.store import Store
from registry.values import Actor, Provenance

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
PAUSED = "paused"
RESTARTS = "training restarts from the start (no mid-training state is kept)"
"""What pausing and resuming a job means for its training, said in their events."""
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
FINE_TUNE_PURPOSE = "fine-tune"


class TrainingFile(SQLModel, table=True):
    __tablename__ = "training_files"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: int = Field(foreign_key="tenants.id", index=True)
    purpose: str = Field(max_length=32)
    filename: str = Field(max_length=256)
    bytes: int
    sha256: str = Field(max_length=64)
    line_count: int
    blob_key: str = Field(max_length=512)
    created_at: dt.datetime = timestamp_column()
    deleted_at: dt.datetime | None = timestamp_column(nullable=True)
    """Set when its owner deleted it: its bytes are gone, the row stays for the jobs and
    dataset versions that name it."""


class FineTuningJob(SQLModel, table=True):
    __tablename__ = "fine_tuning_jobs"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: int = Field(foreign_key="tenants.id", index=True)
    status: str = Field(default=QUEUED, max_length=32, index=True)
    model: str = Field(max_length=256)
    """The base model as the client named it."""
    base_fingerprint: str = Field(max_length=64, index=True)
    """The registered base it resolved to; only workers holding this base claim the job."""
    training_file: str = Field(foreign_key="training_files.id", max_length=40)
    validation_file: str | None = Field(
        default=None, foreign_key="training_files.id", max_length=40
    )
    method: str = Field(default="supervised", max_length=32)
    hyperparameters: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    suffix: str | None = Field(default=None, max_length=64)
    seed: int = 0
    json_schema: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    answer_regex: str | None = Field(default=None, max_length=1024)
    """A regular expression the answers must match in full (scored as ``regex_match``)."""
    adapter_name: str = Field(max_length=128)
    """The adapter the result is registered under (and its ``fine_tuned_model``)."""
    fine_tuned_model: str | None = Field(default=None, max_length=128)
    dataset_version_id: int | None = Field(default=None, foreign_key="dataset_versions.id")
    """The dataset version the training file is, when it is one (set at creation)."""
    init_version_id: int | None = Field(default=None, foreign_key="adapter_versions.id")
    """The adapter version whose weights training starts from; None: a new adapter."""
    servable_checkpoints: bool = False
    """Register the run's kept checkpoints as unpromoted versions of the adapter with its
    result, so each is served as ``name@N``. Off by default: a job otherwise ends as one
    version (or none), which retraining, base upgrades and quotas count on."""
    result: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    """Eval metrics and training summary, saved before registration so a re-run can reuse them."""
    worker_id: str | None = Field(default=None, max_length=128)
    heartbeat_at: dt.datetime | None = timestamp_column(nullable=True)
    attempts: int = 0
    error: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    created_at: dt.datetime = timestamp_column()
    started_at: dt.datetime | None = timestamp_column(nullable=True)
    finished_at: dt.datetime | None = timestamp_column(nullable=True)


class FineTuningEvent(SQLModel, table=True):
    __tablename__ = "fine_tuning_events"

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="fine_tuning_jobs.id", index=True, max_length=40)
    level: str = Field(default="info", max_length=16)
    message: str = Field(max_length=4096)
    data: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    created_at: dt.datetime = timestamp_column()


class FineTuningCheckpoint(SQLModel, table=True):
    __tablename__ = "fine_tuning_checkpoints"

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="fine_tuning_jobs.id", index=True, max_length=40)
    step: int
    metrics: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    created_at: dt.datetime = timestamp_column()


@dataclass(frozen=True)
class TrainedVersion:
    """What a worker hands ``JobStore.complete``: the staged adapter, its provenance and
    description, the job's ``result`` (eval metrics, a training summary) and the eval
    results the version gets (a suite and metric it already has are not repeated)."""

    staged: StagedVersion
    provenance: Provenance
    description: str
    result: dict[str, Any]
    scores: list[Score]
    not_better: str | None = None
    """Why the worker found the version no better than the base or production (with the
    numbers). Such a version is promoted only by passing the adapter's gates: with no
    gates, it stays unpromoted."""
    checkpoints: tuple[tuple[int, StagedVersion], ...] = ()
    """(step, staged weights) of the run's kept checkpoints: each registers as a version
    of the adapter, never promoted, served as ``name@N`` (the job's ``result`` maps each
    step to its number under ``checkpoints``)."""


def job_actor(job_id: str) -> Actor:
    """Who the audit log says made a job's registry changes."""
    return Actor(f"job:{job_id}")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _job_not_found(job_id: str) -> NotFound:
    return NotFound(f"fine-tuning job {job_id!r} does not exist; list your jobs to see their ids")


def _file_not_found(file_id: str) -> NotFound:
    return NotFound(f"file {file_id!r} does not exist; list your files to see their ids")


class JobStore(Store):
    """Files, jobs, events and checkpoints on the registry's database and blob store."""

    def __init__(
        self, registry: Registry, *, stale_after: float = 120.0, max_attempts: int = 3
    ) -> None:
        self.registry = registry
        self.database, self.blobs, self.limits = registry.database, registry.blobs, registry.limits
        self.stale_after = dt.timedelta(seconds=stale_after)
        """A running job whose heartbeat is older than this is presumed orphaned."""
        self.max_attempts = max_attempts
        """Claims a job gets before a stale heartbeat fails it instead of re-queueing it."""

    # -- files ---------------------------------------------------------------------

    def create_file(
        self, tenant_id: int, filename: str, purpose: str, content: bytes
    ) -> TrainingFile:
        """Store an uploaded file's bytes in the blob store and record it."""
        if purpose != FINE_TUNE_PURPOSE:
            raise InvalidRequest(f"purpose {purpose!r} is not supported; use 'fine-tune'")
        self.registry.get_tenant(tenant_id)
        record = self.stage_file(tenant_id, filename, content)
        with self._write() as s:
            s.add(record)
        return record

    def stage_file(self, tenant_id: int, filename: str, content: bytes) -> TrainingFile:
        """Put a fine-tuning file's bytes in the blob store; the caller adds the record.

        A record never written (a failed transaction) leaves only an unreferenced blob.
        """
        record = TrainingFile(
            id=new_id("file"),
            tenant_id=tenant_id,
            purpose=FINE_TUNE_PURPOSE,
            filename=filename[:256],
            bytes=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
            line_count=sum(1 for line in content.splitlines() if line.strip()),
            blob_key="",
        )
        record.blob_key = f"files/{record.id}"
        with tempfile.TemporaryDirectory(prefix="loraplex-file-") as tmp:
            path = Path(tmp) / "upload"
            path.write_bytes(content)
            self.blobs.put(record.blob_key, path)
        return record

    def get_file(self, tenant_id: int, file_id: str) -> TrainingFile:
        with self._read() as s:
            record = s.get(TrainingFile, file_id)
        if record is None or record.tenant_id != tenant_id or record.deleted_at is not None:
            raise _file_not_found(file_id)
        return record

    def list_files(self, tenant_id: int) -> list[TrainingFile]:
        with self._read() as s:
            query = select(TrainingFile).where(
                TrainingFile.tenant_id == tenant_id, col(TrainingFile.deleted_at).is_(None)
            )
            return list(s.exec(query.order_by(col(TrainingFile.created_at).desc())).all())

    def delete_file(self, tenant_id: int, file_id: str) -> TrainingFile:
        """Delete a file's bytes; its record stays, marked deleted, for what names it.

        Deleting a deleted file again does it again (so an erasure cut short can finish).
        """
        with self._write() as s:
            record = s.get(TrainingFile, file_id, with_for_update=True)
            if record is None or record.tenant_id != tenant_id:
                raise _file_not_found(file_id)
            record.deleted_at = record.deleted_at or utcnow()
            s.add(record)
        self.blobs.delete(record.blob_key)  # after the commit: a failure leaves a stray blob
        return record

    def file_content(self, record: TrainingFile) -> bytes:
        """The file's bytes, hash-verified by the blob store."""
        with tempfile.TemporaryDirectory(prefix="loraplex-file-") as tmp:
            path = Path(tmp) / "content"
            self.blobs.fetch(record.blob_key, record.sha256, path)
            return path.read_bytes()

    # -- jobs ----------------------------------------------------------------------

    def create_job(self, job: FineTuningJob) -> FineTuningJob:
        """Insert a new job (its id, tenant and files set by the caller) and log it.

        A job whose adapter name the registry would refuse at registration is refused
        now (``InvalidRequest``), not after hours of training.
        """
        check_adapter_name(job.adapter_name)
        with self._write() as s:
            s.add(job)
            s.flush()
            s.add(FineTuningEvent(job_id=job.id, message=f"Created fine-tuning job: {job.id}"))
        return job

    def get_job(self, tenant_id: int | None, job_id: str) -> FineTuningJob:
        """The job; ``tenant_id`` None (workers, operators) skips the tenant check."""
        with self._read() as s:
            job = s.get(FineTuningJob, job_id)
        if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
            raise _job_not_found(job_id)
        return job

    def list_jobs(
        self, tenant_id: int, after: str | None = None, limit: int = 20
    ) -> list[FineTuningJob]:
        """Newest first; ``after`` is the last id of the previous page."""
        with self._read() as s:
            query = select(FineTuningJob).where(FineTuningJob.tenant_id == tenant_id)
            if after is not None:
                anchor = self.get_job(tenant_id, after)
                query = query.where(col(FineTuningJob.created_at) < anchor.created_at)
            query = query.order_by(col(FineTuningJob.created_at).desc()).limit(limit)
            return list(s.exec(query).all())

    def cancel(self, tenant_id: int, job_id: str) -> FineTuningJob:
        """Cancel a job that has not finished; its worker notices at its next heartbeat."""
        with self._write() as s:
            job = self._owned(s, tenant_id, job_id)
            if job.status in FINISHED:
                raise InvalidRequest(
                    f"job {job_id} already finished ({job.status}); only unfinished jobs "
                    "can be cancelled"
                )
            job.status, job.finished_at = CANCELLED, utcnow()
            s.add(job)
            s.add(FineTuningEvent(job_id=job_id, message="Job cancelled"))
            _audit_end(s, job)
        return job

    def pause(self, tenant_id: int, job_id: str) -> FineTuningJob:
        """Pause a queued or running job: no worker claims it, and a running one's worker
        stops at its next heartbeat (its attempt does not count against ``max_attempts``)."""
        with self._write() as s:
            job = self._owned(s, tenant_id, job_id)
            if job.status not in (QUEUED, RUNNING):
                raise InvalidRequest(
                    f"job {job_id} is {job.status}; only queued or running jobs can be paused"
                )
            if job.status == RUNNING:
                job.attempts = max(job.attempts - 1, 0)
            was, job.status, job.worker_id = job.status, PAUSED, None
            s.add(job)
            stops = "its worker stops at its next heartbeat; " if was == RUNNING else ""
            message = f"Job paused ({was}): {stops}resuming re-queues it and {RESTARTS}"
            self._event(s, job_id, message, data={"paused_from": was})
            _audit_change(s, job, "paused")
        return job

    def resume(self, tenant_id: int, job_id: str) -> FineTuningJob:
        """Put a paused job back in the queue, to be trained from the start."""
        with self._write() as s:
            job = self._owned(s, tenant_id, job_id)
            if job.status != PAUSED:
                raise InvalidRequest(
                    f"job {job_id} is {job.status}; only paused jobs can be resumed"
                )
            job.status = QUEUED
            s.add(job)
            self._event(s, job_id, f"Job resumed: re-queued; {RESTARTS}")
            _audit_change(s, job, "resumed")
        return job

    def _owned(self, s: Session, tenant_id: int, job_id: str) -> FineTuningJob:
        """The tenant's job, row-locked; a foreign one is not found, like an unknown one."""
        job = s.get(FineTuningJob, job_id, with_for_update=True)
        if job is None or job.tenant_id != tenant_id:
            raise _job_not_found(job_id)
        return job

    # -- events and checkpoints ----------------------------------------------------

    def add_event(
        self,
        job_id: str,
        message: str,
        level: str = "info",
        data: dict[str, Any] | None = None,
    ) -> None:
        with self._write() as s:
            self._event(s, job_id, message, level, data)

    def _event(
        self,
        s: Session,
        job_id: str,
        message: str,
        level: str = "info",
        data: dict[str, Any] | None = None,
    ) -> None:
        s.add(FineTuningEvent(job_id=job_id, message=message[:4096], level=level, data=data))

    def events(
        self, tenant_id: int | None, job_id: str, after: int | None = None, limit: int = 20
    ) -> list[FineTuningEvent]:
        """Newest first, like OpenAI's list; ``after`` is an event id of the previous page."""
        self.get_job(tenant_id, job_id)
        with self._read() as s:
            query = select(FineTuningEvent).where(FineTuningEvent.job_id == job_id)
            if after is not None:
                query = query.where(col(FineTuningEvent.id) < after)
            query = query.order_by(col(FineTuningEvent.id).desc()).limit(limit)
            return list(s.exec(query).all())

    def add_checkpoint(self, job_id: str, step: int, metrics: dict[str, Any]) -> None:
        with self._write() as s:
            s.add(FineTuningCheckpoint(job_id=job_id, step=step, metrics=metrics))

    def checkpoints(self, tenant_id: int | None, job_id: str) -> list[FineTuningCheckpoint]:
        self.get_job(tenant_id, job_id)
        with self._read() as s:
            query = select(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job_id)
            return list(s.exec(query.order_by(col(FineTuningCheckpoint.step).desc())).all())

    # -- the queue -----------------------------------------------------------------

    def claim(self, worker_id: str, bases: Sequence[str]) -> FineTuningJob | None:
        """Take the oldest queued job on one of ``bases`` (fingerprints); None if there is none."""
        with self._write() as s:
            job_id = self._lock_next_queued(s, bases)
            if job_id is None:
                return None
            now = utcnow()
            claimed = s.execute(
                text(
                    "UPDATE fine_tuning_jobs SET status = :running, worker_id = :worker, "
                    "heartbeat_at = :now, started_at = COALESCE(started_at, :now), "
                    "attempts = attempts + 1 WHERE id = :id AND status = :queued"
                ),
                {
                    "running": RUNNING,
                    "worker": worker_id,
                    "now": now,
                    "id": job_id,
                    "queued": QUEUED,
                },
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                return None
            s.add(FineTuningEvent(job_id=job_id, message=f"Claimed by worker {worker_id}"))
        return self.get_job(None, job_id)

    def _lock_next_queued(self, s: Session, bases: Sequence[str]) -> str | None:
        query = (
            select(FineTuningJob.id)
            .where(FineTuningJob.status == QUEUED, col(FineTuningJob.base_fingerprint).in_(bases))
            .order_by(col(FineTuningJob.created_at), col(FineTuningJob.id))
            .limit(1)
        )
        if self.database.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        # SQLite: this write transaction began IMMEDIATE, so no other writer runs until commit.
        return s.exec(query).first()

    def heartbeat(self, job_id: str, worker_id: str) -> bool:
        """Refresh the heartbeat; False when the job is no longer this worker's to run."""
        with self._write() as s:
            result = s.execute(
                text(
                    "UPDATE fine_tuning_jobs SET heartbeat_at = :now "
                    "WHERE id = :id AND worker_id = :worker AND status = :running"
                ),
                {"now": utcnow(), "id": job_id, "worker": worker_id, "running": RUNNING},
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def succeed(
        self,
        job_id: str,
        worker_id: str,
        fine_tuned_model: str | None,
        result: dict[str, Any] | None = None,
    ) -> bool:
        """Succeed the job (``result``: what an evaluation-only job measured, which
        registers no version and so has no ``fine_tuned_model``)."""
        values: dict[str, Any] = {"fine_tuned_model": fine_tuned_model, "finished_at": utcnow()}
        if result is not None:
            values["result"] = result
        return self._finish_step(job_id, worker_id, values, SUCCEEDED)

    def fail(self, job_id: str, worker_id: str, code: str, message: str) -> bool:
        values = {"error": {"code": code, "message": message, "param": None}}
        return self._finish_step(job_id, worker_id, {**values, "finished_at": utcnow()}, FAILED)

    def _finish_step(
        self, job_id: str, worker_id: str, values: dict[str, Any], status: str
    ) -> bool:
        """Set ``values`` and ``status`` only while this worker still runs the job."""
        with self._write() as s:
            job = self._held(s, job_id, worker_id)
            if job is None:
                return False
            for name, value in values.items():
                setattr(job, name, value)
            self._end(s, job, status)
        return True

    def _held(self, s: Session, job_id: str, worker_id: str) -> FineTuningJob | None:
        """The job, row-locked, while ``worker_id`` runs it; None once it is not its own."""
        job = s.get(FineTuningJob, job_id, with_for_update=True)
        if job is None or job.worker_id != worker_id or job.status != RUNNING:
            return None
        return job

    def _end(self, s: Session, job: FineTuningJob, status: str) -> None:
        job.status = status
        s.add(job)
        s.add(FineTuningEvent(job_id=job.id, message=f"Job {status}", data=job.error))
        _audit_end(s, job)

    def complete(self, job_id: str, worker_id: str, trained: TrainedVersion) -> str | None:
        """Register, score and promote the trained version and succeed the job, in one
        transaction and only while ``worker_id`` still runs the job.

        Returns the job's ``fine_tuned_model``: the adapter's name, or ``name@N`` when
        promotion gates refuse the version, or when it has no gates and the worker found
        it ``not_better``. None, with nothing written, when the job is
        no longer this worker's (cancelled, or reaped after a stall).
        """
        return self._retrying(lambda: self._complete_once(job_id, worker_id, trained))

    def _complete_once(self, job_id: str, worker_id: str, trained: TrainedVersion) -> str | None:
        actor = job_actor(job_id)
        with self._write() as s:
            # The job's row first, then the adapter's: no transaction locks them the other
            # way round, so a completion never deadlocks with a heartbeat or a promotion.
            job = self._held(s, job_id, worker_id)
            if job is None:
                return None
            staged, provenance = trained.staged, trained.provenance
            version = self.registry.push_in(s, staged, actor, provenance, trained.description)
            self._event(s, job_id, f"Registered {job.adapter_name} version {version.number}")
            served = self._checkpoint_versions(s, job, trained, actor)
            self._score(s, version, trained, actor)
            job.fine_tuned_model = self._promote(s, job, version, trained, actor)
            shown = {"checkpoints": served} if served else {}  # only a servable-checkpoints job's
            job.result, job.finished_at = {**trained.result, **shown}, utcnow()
            self._end(s, job, SUCCEEDED)
        return job.fine_tuned_model

    def _checkpoint_versions(
        self, s: Session, job: FineTuningJob, trained: TrainedVersion, actor: Actor
    ) -> dict[str, int]:
        """Register the kept checkpoints after the result (which keeps the number a job's
        version always had; a checkpoint holding its weights is that version), unpromoted:
        step -> version number. In the job's transaction: a killed job leaves none."""
        served: dict[str, int] = {}
        if not job.servable_checkpoints:
            return served
        for step, staged in trained.checkpoints:
            version = self.registry.push_in(s, staged, actor, trained.provenance)
            served[str(step)] = version.number
        if served:
            names = ", ".join(f"step {k}: {job.adapter_name}@{n}" for k, n in served.items())
            self._event(s, job.id, f"Checkpoints registered as servable versions ({names})")
        return served

    def _score(
        self, s: Session, version: AdapterVersion, trained: TrainedVersion, actor: Actor
    ) -> None:
        # The version may hold weights pushed before (an upload, or another job's).
        query = select(EvalResult).where(EvalResult.version_id == version.id)
        stored = {(r.suite, r.metric) for r in s.exec(query)}
        for score in trained.scores:
            if (score.suite, score.metric) not in stored:
                self.registry.add_eval_result_in(s, version, score, actor)

    def _promote(
        self,
        s: Session,
        job: FineTuningJob,
        version: AdapterVersion,
        trained: TrainedVersion,
        actor: Actor,
    ) -> str:
        """Point production at the version; the name clients call (pinned if not promoted)."""
        adapter = s.get(Adapter, version.adapter_id)
        assert adapter is not None and adapter.id is not None
        current = lifecycle.aliases(s, adapter.id).get(PRODUCTION)
        if current is not None and current.version_id == version.id:
            return job.adapter_name
        serving = s.get(AdapterVersion, current.version_id) if current is not None else None
        if serving is not None and serving.base_id != version.base_id:
            # Moving an adapter to another base is a migration (canary first: a base
            # upgrade, ``registry.upgrades``, does it), never a job's side effect.
            self._event(s, job.id, "Not promoted: production runs on another base", level="warn")
            return f"{job.adapter_name}@{version.number}"
        gated = s.exec(select(PromotionGate).where(PromotionGate.adapter_id == adapter.id))
        if trained.not_better is not None and gated.first() is None:
            self._event(s, job.id, f"Not promoted: {trained.not_better}", level="warn")
            return f"{job.adapter_name}@{version.number}"
        try:
            self.registry.promote_in(s, adapter, version, actor)
        except GateFailed as exc:
            self._event(s, job.id, f"Not promoted: {exc}", level="warn")
            return f"{job.adapter_name}@{version.number}"
        self._event(s, job.id, f"Promoted version {version.number} to production")
        return job.adapter_name

    def reap(self, now: dt.datetime | None = None) -> list[str]:
        """Re-queue (or fail, after ``max_attempts``) running jobs with a stale heartbeat."""
        cutoff = (now or utcnow()) - self.stale_after
        reaped = []
        with self._write() as s:
            query = select(FineTuningJob).where(
                FineTuningJob.status == RUNNING, col(FineTuningJob.heartbeat_at) < cutoff
            )
            if self.database.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            for job in s.exec(query).all():
                reaped.append(job.id)
                self._orphaned(s, job)
        return reaped

    def _orphaned(self, s: Session, job: FineTuningJob) -> None:
        lost = f"worker {job.worker_id} stopped heartbeating (attempt {job.attempts})"
        if job.attempts >= self.max_attempts:
            job.status, job.finished_at = FAILED, utcnow()
            job.error = {
                "code": "worker_lost",
                "message": f"{lost}; gave up after {job.attempts} attempts. Check the worker "
                "logs (out of memory?) and create the job again.",
                "param": None,
            }
        else:
            job.status, job.worker_id = QUEUED, None
        s.add(job)
        message = f"{lost}; job {'failed' if job.status == FAILED else 're-queued'}"
        s.add(FineTuningEvent(job_id=job.id, level="warn", message=message))
        if job.status == FAILED:
            _audit_end(s, job)


def _audit_change(s: Session, job: FineTuningJob, what: str) -> None:
    """The audit event of a job paused or resumed by its owner (``fine_tuning.job.<what>``)."""
    audit.record(
        s,
        f"tenant:{job.tenant_id}",
        f"fine_tuning.job.{what}",
        f"job:{job.id}",
        tenant_id=job.tenant_id,
        after={"status": job.status},
    )


def _audit_end(s: Session, job: FineTuningJob) -> None:
    """The audit event of a job's end (``fine_tuning.job.<status>``: the event log's)."""
    after = {"status": job.status, "fine_tuned_model": job.fine_tuned_model, "error": job.error}
    action = f"fine_tuning.job.{job.status}"
    audit.record(
        s, job_actor(job.id).name, action, f"job:{job.id}", tenant_id=job.tenant_id, after=after
    )
