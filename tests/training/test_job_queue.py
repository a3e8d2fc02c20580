"""The job queue on SQLite and PostgreSQL: claims, concurrency, heartbeats, reaping, tenancy."""

from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from registry import BaseModelRecord, InvalidRequest, NotFound, Registry, Tenant
from registry.jobs import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobStore,
)
from registry.models import utcnow
from tests.training.conftest import ADMIN, Bench
from tests.training.training_testdata import fixed_answer_records, jsonl


def test_files_are_stored_hashed_and_tenant_scoped(
    store: JobStore, registry: Registry, tenant: Tenant
) -> None:
    assert tenant.id is not None
    content = jsonl(fixed_answer_records(3))
    record = store.create_file(tenant.id, "train.jsonl", "fine-tune", content)
    assert (record.bytes, record.line_count) == (len(content), 3)
    assert store.file_content(store.get_file(tenant.id, record.id)) == content
    other = registry.create_tenant("globex", ADMIN)
    assert other.id is not None
    with pytest.raises(NotFound) as foreign:
        store.get_file(other.id, record.id)
    with pytest.raises(NotFound) as unknown:
        store.get_file(other.id, "file-000000000000000000000000")
    assert str(foreign.value).replace(record.id, "X") == str(unknown.value).replace(
        "file-000000000000000000000000", "X"
    )
    with pytest.raises(InvalidRequest, match="use 'fine-tune'"):
        store.create_file(tenant.id, "x.jsonl", "assistants", content)


def test_claims_take_the_oldest_queued_job_for_the_workers_base(
    store: JobStore, tenant: Tenant, base: BaseModelRecord, bench: Bench
) -> None:
    first, second = bench.submit(), bench.submit()
    assert store.claim("w1", ["some-other-base"]) is None
    claimed = store.claim("w1", [base.fingerprint])
    assert claimed is not None and claimed.id == first.id
    assert (claimed.status, claimed.worker_id, claimed.attempts) == (RUNNING, "w1", 1)
    assert claimed.heartbeat_at is not None
    again = store.claim("w2", [base.fingerprint])
    assert again is not None and again.id == second.id
    assert store.claim("w3", [base.fingerprint]) is None


def test_concurrent_workers_never_claim_the_same_job(
    store: JobStore, tenant: Tenant, base: BaseModelRecord, bench: Bench
) -> None:
    jobs = {bench.submit().id for _ in range(6)}
    barrier = threading.Barrier(4)

    def claim_all(worker: str) -> list[str]:
        barrier.wait()
        claimed = []
        while (job := store.claim(worker, [base.fingerprint])) is not None:
            claimed.append(job.id)
        return claimed

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(claim_all, ["w1", "w2", "w3", "w4"]))
    flat = [job for claimed in results for job in claimed]
    assert sorted(flat) == sorted(jobs)  # each job exactly once


def test_heartbeats_belong_to_the_claiming_worker(
    store: JobStore, tenant: Tenant, base: BaseModelRecord, bench: Bench
) -> None:
    job = bench.submit()
    assert store.claim("w1", [base.fingerprint]) is not None
    assert store.heartbeat(job.id, "w1")
    assert not store.heartbeat(job.id, "w2")
    assert not store.succeed(job.id, "w2", "bot")
    assert store.succeed(job.id, "w1", "bot")
    assert not store.heartbeat(job.id, "w1")  # finished jobs take no heartbeats
    assert store.get_job(tenant.id, job.id).status == SUCCEEDED


def test_stale_jobs_are_requeued_then_failed_after_max_attempts(
    store: JobStore, tenant: Tenant, base: BaseModelRecord, bench: Bench
) -> None:
    job = bench.submit()
    later = utcnow() + dt.timedelta(seconds=store.stale_after.total_seconds() + 1)
    assert store.claim("w1", [base.fingerprint]) is not None
    assert store.reap() == []  # fresh heartbeat
    assert store.reap(now=later) == [job.id]
    requeued = store.get_job(tenant.id, job.id)
    assert (requeued.status, requeued.worker_id, requeued.attempts) == (QUEUED, None, 1)
    assert not store.heartbeat(job.id, "w1")  # the dead worker lost it
    assert store.claim("w2", [base.fingerprint]) is not None
    assert store.reap(now=later + dt.timedelta(seconds=1)) == [job.id]
    failed = store.get_job(tenant.id, job.id)
    assert failed.status == FAILED and failed.error is not None
    assert failed.error["code"] == "worker_lost"
    assert "gave up after 2 attempts" in failed.error["message"]
    messages = [e.message for e in store.events(tenant.id, job.id, limit=50)]
    assert any("re-queued" in m for m in messages) and any("job failed" in m for m in messages)


def test_cancel_stops_the_worker_and_is_final(
    store: JobStore, tenant: Tenant, base: BaseModelRecord, bench: Bench
) -> None:
    assert tenant.id is not None
    queued, running = bench.submit(), bench.submit()
    assert store.cancel(tenant.id, queued.id).status == CANCELLED
    claimed = store.claim("w1", [base.fingerprint])
    assert claimed is not None and claimed.id == running.id  # the cancelled one is skipped
    store.cancel(tenant.id, running.id)
    assert not store.heartbeat(running.id, "w1")
    assert not store.succeed(running.id, "w1", "bot")
    with pytest.raises(InvalidRequest, match="already finished"):
        store.cancel(tenant.id, running.id)


def test_jobs_events_and_checkpoints_are_tenant_scoped(
    store: JobStore, registry: Registry, tenant: Tenant, base: BaseModelRecord, bench: Bench
) -> None:
    job = bench.submit()
    store.add_checkpoint(job.id, 5, {"valid_loss": 1.0})
    other = registry.create_tenant("globex", ADMIN)
    assert other.id is not None and tenant.id is not None
    for call in (store.get_job, store.events, store.checkpoints, store.cancel):
        with pytest.raises(NotFound, match="does not exist"):
            call(other.id, job.id)
    assert store.list_jobs(other.id) == []
    assert [c.step for c in store.checkpoints(tenant.id, job.id)] == [5]
    newer = bench.submit()
    assert [j.id for j in store.list_jobs(tenant.id)] == [newer.id, job.id]
    assert [j.id for j in store.list_jobs(tenant.id, after=newer.id)] == [job.id]
