"""Training fixtures: a tiny chat base, and registries on SQLite and on PostgreSQL.

PostgreSQL (127.0.0.1:5432) being down fails the PostgreSQL-backed tests; nothing skips.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import SQLModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))
from registry_testdata import create_database, drop_database

from registry import Actor, BaseModelRecord, LocalBlobStore, Registry, Tenant
from registry.jobs import FineTuningJob, JobStore, new_id
from tests.training.training_testdata import (
    FAST,
    build_tiny_chat_base,
    fixed_answer_records,
    jsonl,
)
from training.worker import Worker, WorkerOptions

ADMIN = Actor("test-admin", admin=True)


@pytest.fixture(scope="session")
def chat_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_base(tmp_path_factory.mktemp("chat-base") / "base")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = create_database("loraplex_training_test")
    yield url
    drop_database(url)


def _empty(url: str) -> None:
    registry = Registry(url, LocalBlobStore(Path("/nonexistent-unused")))
    tables = ", ".join(t.name for t in SQLModel.metadata.sorted_tables)
    with registry.database.begin() as conn:
        conn.execute(text(f"TRUNCATE TABLE {tables} RESTART IDENTITY CASCADE"))
    registry.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    url: str = request.getfixturevalue("pg_url")
    _empty(url)
    return url


@pytest.fixture
def registry(database_url: str, tmp_path: Path) -> Iterator[Registry]:
    registry = Registry(database_url, LocalBlobStore(tmp_path / "blobs"))
    yield registry
    registry.close()


@pytest.fixture
def store(registry: Registry) -> JobStore:
    return JobStore(registry, stale_after=60, max_attempts=2)


@pytest.fixture
def tenant(registry: Registry) -> Tenant:
    return registry.create_tenant("acme", ADMIN)


@pytest.fixture
def base(registry: Registry, chat_base: Path) -> BaseModelRecord:
    return registry.register_base(chat_base, "tiny-chat", "r1", ADMIN)


@dataclass
class Bench:
    """A tenant on a registry with a base: submits jobs and makes workers for it."""

    registry: Registry
    store: JobStore
    tenant_id: int
    base: BaseModelRecord
    chat_base: Path
    work_dir: Path

    def submit(
        self, records: list[dict[str, Any]] | None = None, adapter: str = "bot", **fields: Any
    ) -> FineTuningJob:
        """Upload ``records`` (default: a small fixed-answer set) and queue a job on them."""
        content = jsonl(records if records is not None else fixed_answer_records(4))
        file = self.store.create_file(self.tenant_id, "train.jsonl", "fine-tune", content)
        values: dict[str, Any] = {"seed": 7, **fields}
        job = FineTuningJob(
            id=new_id("ftjob"),
            tenant_id=self.tenant_id,
            model=self.base.name,
            base_fingerprint=self.base.fingerprint,
            training_file=file.id,
            adapter_name=adapter,
            **values,
        )
        return self.store.create_job(job)

    def worker(self, store: JobStore | None = None) -> Worker:
        """A fast-polling, fast-heartbeating worker with the tests' quick hyperparameters."""
        options = WorkerOptions(
            self.chat_base, self.base.fingerprint, self.work_dir, FAST, 0.1, 0.2, False
        )
        return Worker(store or self.store, options, "test-worker")

    def job(self, job_id: str) -> FineTuningJob:
        return self.store.get_job(self.tenant_id, job_id)


@pytest.fixture
def bench(
    registry: Registry,
    store: JobStore,
    tenant: Tenant,
    base: BaseModelRecord,
    chat_base: Path,
    tmp_path: Path,
) -> Bench:
    assert tenant.id is not None
    return Bench(registry, store, tenant.id, base, chat_base, tmp_path / "work")
