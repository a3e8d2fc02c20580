"""Erasure: deleting a file, a stored completion, or every record of one end user.

An erasure deletes the source itself (a file's bytes; stored completions with their
feedback), deletes every dataset example that came only from it, so no later dataset
version holds it (``DatasetStore.erase``), and keeps a record: what was erased, by whom,
and the lineage it had (the dataset versions that held its examples, and the adapter
versions trained on them). The record is in the audit log as well.

``retrain`` is the one call that retrains without it: for every dataset in the lineage
that trained an adapter version, a new version without the erased examples and a job
that repeats the last job trained on that dataset, on it.

Each step is its own transaction and every step can run again: an erasure cut short by a
crash is finished by asking for it again.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import JSON, DateTime
from sqlmodel import Field, SQLModel, col, select

from registry import audit
from registry.captures import CaptureStore
from registry.datasets import DatasetStore, VersionChange
from registry.errors import InvalidRequest, NotFound
from registry.jobs import FineTuningJob, JobStore, new_id
from registry.models import utcnow
from registry.store import Store
from registry.values import Actor

Kind = Literal["file", "completion", "user"]


class Erasure(SQLModel, table=True):
    __tablename__ = "erasures"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: int = Field(foreign_key="tenants.id", index=True)
    kind: str = Field(max_length=16)
    subject: str = Field(max_length=256)
    """The file id, the completion id or the end user's ``user`` value."""
    lineage: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    retrain_jobs: list[str] = Field(default_factory=list, sa_type=JSON)
    created_by: str = Field(default="", max_length=256)
    created_at: dt.datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


@dataclass(frozen=True)
class Subject:
    kind: Kind
    value: str

    def __post_init__(self) -> None:
        if self.kind not in ("file", "completion", "user"):
            raise InvalidRequest("erase a 'file', a 'completion' or a 'user'")
        if not self.value or len(self.value) > 256 or "\x00" in self.value:
            raise InvalidRequest(f"the {self.kind} to erase must be 1-256 characters")


def _erasure_not_found(erasure_id: str) -> NotFound:
    return NotFound(f"erasure {erasure_id!r} does not exist; list your erasures to see their ids")


class ErasureStore(Store):
    """Erasures on the registry's database, through the file, capture and dataset stores."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs
        self.datasets = DatasetStore(jobs)
        self.captures = CaptureStore(jobs.registry)
        self.database, self.blobs, self.limits = jobs.database, jobs.blobs, jobs.limits

    def erase(self, tenant_id: int, subject: Subject, actor: Actor) -> Erasure:
        """Delete the subject and its examples; the record of what it had reached."""
        if subject.kind == "file":
            self.jobs.delete_file(tenant_id, subject.value)
            lineage = self.datasets.erase(tenant_id, actor, file_id=subject.value)
        elif subject.kind == "completion":
            self._delete_completion(tenant_id, subject.value)
            lineage = self.datasets.erase(tenant_id, actor, completion_ids=[subject.value])
        else:
            self.captures.delete_user(tenant_id, subject.value)
            lineage = self.datasets.erase(tenant_id, actor, user=subject.value)
        record = Erasure(
            id=new_id("erasure"),
            tenant_id=tenant_id,
            kind=subject.kind,
            subject=subject.value,
            lineage=lineage.to_json(),
            created_by=actor.name,
        )
        with self._write() as s:
            s.add(record)
            audit.record(
                s, actor.name, f"erase.{subject.kind}", subject.value,
                tenant_id=tenant_id, after={"erasure": record.id, **record.lineage},
            )  # fmt: skip
        return record

    def _delete_completion(self, tenant_id: int, completion_id: str) -> None:
        try:
            self.captures.delete(tenant_id, completion_id)
        except NotFound:
            # Deleted already, by an erasure cut short: its examples are still to erase.
            if not self.datasets.lineage(tenant_id, completion_ids=[completion_id]).examples:
                raise

    def get(self, tenant_id: int, erasure_id: str) -> Erasure:
        with self._read() as s:
            record = s.get(Erasure, erasure_id)
        if record is None or record.tenant_id != tenant_id:
            raise _erasure_not_found(erasure_id)
        return record

    def list_erasures(self, tenant_id: int, limit: int = 100) -> list[Erasure]:
        with self._read() as s:
            query = select(Erasure).where(Erasure.tenant_id == tenant_id)
            return list(s.exec(query.order_by(col(Erasure.created_at).desc()).limit(limit)))

    def retrain(self, tenant_id: int, erasure_id: str, actor: Actor) -> list[FineTuningJob]:
        """Per dataset that trained an adapter version in the erasure's lineage: a new
        version without the erased examples, and its last job repeated on it."""
        record = self.get(tenant_id, erasure_id)
        trained = {a["training_job"] for a in record.lineage.get("adapter_versions", [])}
        names = sorted({d["dataset"] for d in record.lineage.get("dataset_versions", [])})
        queued: list[FineTuningJob] = []
        for name in names:
            source = {"erasure": record.id}
            version, _ = self.datasets.add_version(
                tenant_id, name, VersionChange(method=self._method(tenant_id, name), source=source),
                actor,
            )  # fmt: skip
            last = self.datasets.last_job(tenant_id, version)
            if last is None or last.id not in trained:
                continue  # nothing trained on this dataset reached the erased examples
            assert version.id is not None
            queued.append(self.jobs.create_job(repeated(last, version.file_id, version.id)))
        with self._write() as s:
            row = s.get_one(Erasure, erasure_id)
            row.retrain_jobs = [*row.retrain_jobs, *(job.id for job in queued)]
            s.add(row)
        return queued

    def _method(self, tenant_id: int, name: str) -> Any:
        return self.datasets.get_version(tenant_id, name).method


def repeated(job: FineTuningJob, training_file: str, dataset_version_id: int) -> FineTuningJob:
    """A new job like ``job`` (base, method, settings, adapter) on another training file,
    from the base's weights."""
    return FineTuningJob(
        id=new_id("ftjob"),
        tenant_id=job.tenant_id,
        model=job.model,
        base_fingerprint=job.base_fingerprint,
        training_file=training_file,
        validation_file=job.validation_file,
        method=job.method,
        hyperparameters=dict(job.hyperparameters),
        suffix=job.suffix,
        seed=job.seed,
        json_schema=job.json_schema,
        adapter_name=job.adapter_name,
        dataset_version_id=dataset_version_id,
        # From scratch: weights that continued from a version trained on the erased data
        # would still carry it.
        init_version_id=None,
    )
