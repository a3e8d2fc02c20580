"""Fine-tuning files and jobs: the tables, and the queue workers claim jobs from.

A job moves ``queued -> running -> succeeded | failed | cancelled`` (``validating_files``
is the state of a job whose files are still being checked). Workers claim the oldest
queued job with row locking that is safe with many workers: ``SELECT ... FOR UPDATE
SKIP LOCKED`` on PostgreSQL; on SQLite one conditional ``UPDATE`` inside a write
transaction (SQLite serialises writers, so two workers can't win the same row). A
running job's worker heartbeats; a reaper returns jobs whose heartbeat went stale to the
queue, or fails them once they have used up their attempts.

Everything is tenant-scoped: a foreign id raises the same ``NotFound`` as an unknown one.
Uploaded file bytes live in the registry's blob store under ``files/<id>``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, text
from sqlmodel import Field, Session, SQLModel, col, select

from registry.errors import InvalidRequest, NotFound
from registry.models import utcnow
from registry.registry import Registry
from registry.store import Store

VALIDATING_FILES = "validating_files"
QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
STATUSES = (VALIDATING_FILES, QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
FINE_TUNE_PURPOSE = "fine-tune"


def _when(nullable: bool = False) -> Any:
    if nullable:
        return Field(default=None, sa_type=DateTime(timezone=True))
    return Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


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
    created_at: dt.datetime = _when()


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
    adapter_name: str = Field(max_length=128)
    """The adapter the result is registered under (and its ``fine_tuned_model``)."""
    fine_tuned_model: str | None = Field(default=None, max_length=128)
    result: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    """Eval metrics and training summary, saved before registration so a re-run can reuse them."""
    worker_id: str | None = Field(default=None, max_length=128)
    heartbeat_at: dt.datetime | None = _when(nullable=True)
    attempts: int = 0
    error: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    created_at: dt.datetime = _when()
    started_at: dt.datetime | None = _when(nullable=True)
    finished_at: dt.datetime | None = _when(nullable=True)


class FineTuningEvent(SQLModel, table=True):
    __tablename__ = "fine_tuning_events"

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="fine_tuning_jobs.id", index=True, max_length=40)
    level: str = Field(default="info", max_length=16)
    message: str = Field(max_length=4096)
    data: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    created_at: dt.datetime = _when()


class FineTuningCheckpoint(SQLModel, table=True):
    __tablename__ = "fine_tuning_checkpoints"

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="fine_tuning_jobs.id", index=True, max_length=40)
    step: int
    metrics: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    created_at: dt.datetime = _when()


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
        self.engine, self.blobs, self.limits = registry.engine, registry.blobs, registry.limits
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
        record = TrainingFile(
            id=new_id("file"),
            tenant_id=tenant_id,
            purpose=purpose,
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
        with self._write() as s:
            s.add(record)
        return record

    def get_file(self, tenant_id: int, file_id: str) -> TrainingFile:
        with self._read() as s:
            record = s.get(TrainingFile, file_id)
        if record is None or record.tenant_id != tenant_id:
            raise _file_not_found(file_id)
        return record

    def list_files(self, tenant_id: int) -> list[TrainingFile]:
        with self._read() as s:
            query = select(TrainingFile).where(TrainingFile.tenant_id == tenant_id)
            return list(s.exec(query.order_by(col(TrainingFile.created_at).desc())).all())

    def file_content(self, record: TrainingFile) -> bytes:
        """The file's bytes, hash-verified by the blob store."""
        with tempfile.TemporaryDirectory(prefix="loraplex-file-") as tmp:
            path = Path(tmp) / "content"
            self.blobs.fetch(record.blob_key, record.sha256, path)
            return path.read_bytes()

    # -- jobs ----------------------------------------------------------------------

    def create_job(self, job: FineTuningJob) -> FineTuningJob:
        """Insert a new job (its id, tenant and files set by the caller) and log it."""
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
            job = s.get(FineTuningJob, job_id, with_for_update=True)
            if job is None or job.tenant_id != tenant_id:
                raise _job_not_found(job_id)
            if job.status in FINISHED:
                raise InvalidRequest(
                    f"job {job_id} already finished ({job.status}); only unfinished jobs "
                    "can be cancelled"
                )
            job.status, job.finished_at = CANCELLED, utcnow()
            s.add(job)
            s.add(FineTuningEvent(job_id=job_id, message="Job cancelled"))
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
        if self.engine.dialect.name == "postgresql":
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

    def save_result(self, job_id: str, worker_id: str, result: dict[str, Any]) -> bool:
        """Record metrics before registration; False if the job is no longer this worker's."""
        return self._finish_step(job_id, worker_id, {"result": result}, RUNNING)

    def succeed(self, job_id: str, worker_id: str, fine_tuned_model: str) -> bool:
        values = {"fine_tuned_model": fine_tuned_model, "finished_at": utcnow()}
        return self._finish_step(job_id, worker_id, values, SUCCEEDED)

    def fail(self, job_id: str, worker_id: str, code: str, message: str) -> bool:
        values = {"error": {"code": code, "message": message, "param": None}}
        return self._finish_step(job_id, worker_id, {**values, "finished_at": utcnow()}, FAILED)

    def _finish_step(
        self, job_id: str, worker_id: str, values: dict[str, Any], status: str
    ) -> bool:
        """Set ``values`` and ``status`` only while this worker still runs the job."""
        with self._write() as s:
            job = s.get(FineTuningJob, job_id, with_for_update=True)
            if job is None or job.worker_id != worker_id or job.status != RUNNING:
                return False
            for name, value in values.items():
                setattr(job, name, value)
            job.status = status
            s.add(job)
            if status != RUNNING:
                s.add(FineTuningEvent(job_id=job_id, message=f"Job {status}", data=job.error))
        return True

    def reap(self, now: dt.datetime | None = None) -> list[str]:
        """Re-queue (or fail, after ``max_attempts``) running jobs with a stale heartbeat."""
        cutoff = (now or utcnow()) - self.stale_after
        reaped = []
        with self._write() as s:
            query = select(FineTuningJob).where(
                FineTuningJob.status == RUNNING, col(FineTuningJob.heartbeat_at) < cutoff
            )
            if self.engine.dialect.name == "postgresql":
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
