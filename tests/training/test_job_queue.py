"""The job queue on SQLite and PostgreSQL: claims, concurrency, heartbeats, reaping, tenancy,
and completions (registered, scored, promoted and succeeded at once, by the holder only)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from registry_testdata import build_adapter

from registry import PRODUCTION, BaseModelRecord, Gate, InvalidRequest, NotFound, Registry, Tenant
from registry.jobs import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobStore,
    TrainedVersion,
)
from registry.models import utcnow
from registry.registry import Score
from registry.values import Provenance
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


@pytest.mark.parametrize("adapter", ["lx-0123456789abcdef", "LX-bot", "bot@2", "-bot"])
def test_jobs_for_adapter_names_the_registry_refuses_are_refused_at_once(
    store: JobStore, tenant: Tenant, base: BaseModelRecord, bench: Bench, adapter: str
) -> None:
    with pytest.raises(InvalidRequest, match=f"adapter name '{adapter}' is"):
        bench.submit(adapter=adapter)
    assert tenant.id is not None and store.list_jobs(tenant.id) == []


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


@pytest.fixture(scope="module")
def peft_adapter(chat_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_adapter(chat_base, tmp_path_factory.mktemp("peft") / "adapter", seed=3)


def _trained(bench: Bench, job_id: str, adapter: Path, exact_match: float) -> TrainedVersion:
    staged = bench.registry.stage_adapter(bench.tenant_id, "bot", adapter, bench.base.name)
    scores = [Score("fine-tune-test", "exact_match", exact_match, sample_count=5)]
    return TrainedVersion(staged, Provenance(training_job=job_id), "trained", {"steps": 3}, scores)


def test_a_completion_is_all_or_nothing_and_only_the_holders(
    store: JobStore, bench: Bench, peft_adapter: Path
) -> None:
    job = bench.submit()
    assert store.claim("w1", [bench.base.fingerprint]) is not None
    trained = _trained(bench, job.id, peft_adapter, 0.5)
    assert store.complete(job.id, "w2", trained) is None  # not w2's job: nothing written
    assert bench.registry.list_adapters(bench.tenant_id) == []
    assert store.complete(job.id, "w1", trained) == "bot"
    done = bench.job(job.id)
    assert (done.status, done.fine_tuned_model, done.result) == (SUCCEEDED, "bot", {"steps": 3})
    (version,) = bench.registry.list_versions(bench.tenant_id, "bot")
    assert version.training_job == job.id
    assert bench.registry.aliases(bench.tenant_id, "bot")[PRODUCTION].version == 1
    (score,) = bench.registry.eval_results(bench.tenant_id, "bot", 1)
    assert (score.metric, score.value, score.sample_count) == ("exact_match", 0.5, 5)
    assert store.complete(job.id, "w1", trained) is None  # finished: a repeat changes nothing
    assert len(bench.registry.eval_results(bench.tenant_id, "bot", 1)) == 1
    messages = [e.message for e in reversed(store.events(bench.tenant_id, job.id, limit=50))]
    assert messages[-3:] == ["Registered bot version 1", "Promoted version 1 to production",
                             "Job succeeded"]  # fmt: skip


def test_a_completion_the_gates_refuse_registers_the_version_unpromoted(
    store: JobStore, bench: Bench, peft_adapter: Path, tmp_path: Path
) -> None:
    upload = build_adapter(bench.chat_base, tmp_path / "upload", seed=4)
    uploaded = bench.registry.push_adapter(bench.tenant_id, "bot", upload, bench.base.name, ADMIN)
    bench.registry.promote(bench.tenant_id, "bot", uploaded.number, ADMIN)
    bench.registry.set_gates(
        bench.tenant_id, "bot", [Gate("fine-tune-test", "exact_match", min_value=0.9)], ADMIN
    )
    job = bench.submit()
    assert store.claim("w1", [bench.base.fingerprint]) is not None
    assert store.complete(job.id, "w1", _trained(bench, job.id, peft_adapter, 0.5)) == "bot@2"
    assert bench.job(job.id).status == SUCCEEDED
    assert bench.registry.aliases(bench.tenant_id, "bot")[PRODUCTION].version == 1
    events = store.events(bench.tenant_id, job.id, limit=50)
    assert any(e.level == "warn" and e.message.startswith("Not promoted") for e in events)


def test_a_completion_no_better_than_the_base_stays_unpromoted_unless_gates_pass(
    store: JobStore, bench: Bench, peft_adapter: Path
) -> None:
    why = "exact match 0.0 % on 5 held-out examples, base 0.0 %; needs ≥ +5 points over base"
    first = bench.submit()
    assert store.claim("w1", [bench.base.fingerprint]) is not None
    trained = dataclasses.replace(_trained(bench, first.id, peft_adapter, 0.0), not_better=why)
    assert store.complete(first.id, "w1", trained) == "bot@1"
    assert bench.job(first.id).status == SUCCEEDED
    assert PRODUCTION not in bench.registry.aliases(bench.tenant_id, "bot")
    (event,) = [e for e in store.events(bench.tenant_id, first.id) if e.level == "warn"]
    assert event.message == f"Not promoted: {why}"
    # With gates, the gates decide, as for any promotion: these pass.
    bench.registry.set_gates(
        bench.tenant_id, "bot", [Gate("fine-tune-test", "exact_match", min_value=0.0)], ADMIN
    )
    second = bench.submit(adapter="bot")
    assert store.claim("w1", [bench.base.fingerprint]) is not None
    assert store.complete(second.id, "w1", trained) == "bot"
    assert bench.registry.aliases(bench.tenant_id, "bot")[PRODUCTION].version == 1
