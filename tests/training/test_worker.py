"""The job worker: a job ends as one registered, evaluated, promoted version, or as none.

Includes killing a real worker process mid-training (no partial version; the job is
re-queued and a second worker finishes it) and a crash between registration and the
final status (the re-run finishes without training or registering again).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from registry import BaseModelRecord, Registry, Tenant
from registry.jobs import FAILED, QUEUED, RUNNING, SUCCEEDED, FineTuningJob, JobStore, new_id
from registry.models import utcnow
from tests.training.training_testdata import (
    FAST,
    fixed_answer_records,
    jsonl,
    preference_records,
)
from training.worker import TEST_SUITE, Worker, WorkerOptions

REPO = Path(__file__).resolve().parents[2]


def _submit(
    store: JobStore,
    tenant: Tenant,
    base: BaseModelRecord,
    records: list[dict[str, Any]],
    adapter: str = "bot",
    **fields: Any,
) -> FineTuningJob:
    assert tenant.id is not None
    file = store.create_file(tenant.id, "train.jsonl", "fine-tune", jsonl(records))
    job = FineTuningJob(
        id=new_id("ftjob"),
        tenant_id=tenant.id,
        model=base.name,
        base_fingerprint=base.fingerprint,
        training_file=file.id,
        adapter_name=adapter,
        seed=7,
        **fields,
    )
    return store.create_job(job)


def _worker(store: JobStore, base: BaseModelRecord, chat_base: Path, tmp_path: Path) -> Worker:
    options = WorkerOptions(chat_base, base.fingerprint, tmp_path / "work", FAST, 0.1, 0.2)
    return Worker(store, options, "test-worker")


def test_a_job_ends_as_a_registered_evaluated_promoted_version(
    store: JobStore,
    registry: Registry,
    tenant: Tenant,
    base: BaseModelRecord,
    chat_base: Path,
    tmp_path: Path,
) -> None:
    assert tenant.id is not None
    records = fixed_answer_records(60)
    job = _submit(store, tenant, base, records)
    worker = _worker(store, base, chat_base, tmp_path)
    assert worker.run_once() is not None
    done = store.get_job(tenant.id, job.id)
    assert done.status == SUCCEEDED, done.error
    assert done.fine_tuned_model == "bot"
    (version,) = registry.list_versions(tenant.id, "bot")
    assert version.training_job == job.id and version.seed == 7
    assert version.dataset_sha256 == store.get_file(tenant.id, job.training_file).sha256
    assert version.training_config_sha256 == done.result["config_sha256"]  # type: ignore[index]
    assert {"torch", "transformers", "peft"} <= set(version.library_versions)
    assert registry.aliases(tenant.id, "bot")["production"].version == 1
    stored = {(r.suite, r.metric): r for r in registry.eval_results(tenant.id, "bot", 1)}
    assert {(TEST_SUITE, "loss"), (TEST_SUITE, "exact_match")} <= set(stored)
    assert (f"{TEST_SUITE}/base", "loss") in stored
    assert stored[(TEST_SUITE, "loss")].value < stored[(f"{TEST_SUITE}/base", "loss")].value
    assert stored[(TEST_SUITE, "loss")].sample_count == done.result["test_samples"]  # type: ignore[index]
    messages = [e.message for e in reversed(store.events(tenant.id, job.id, limit=100))]
    assert messages[-1] == "Job succeeded"
    assert any(m.startswith("Data audit: 60 examples") for m in messages)
    assert store.checkpoints(tenant.id, job.id)
    assert not (tmp_path / "work" / job.id).exists()  # scratch cleaned up


def test_retraining_compares_with_production_and_records_the_parent(
    store: JobStore,
    registry: Registry,
    tenant: Tenant,
    base: BaseModelRecord,
    chat_base: Path,
    tmp_path: Path,
) -> None:
    assert tenant.id is not None
    worker = _worker(store, base, chat_base, tmp_path)
    _submit(store, tenant, base, fixed_answer_records(40))
    worker.run_once()
    second = _submit(store, tenant, base, fixed_answer_records(40, "Cherry."))
    worker.run_once()
    assert store.get_job(tenant.id, second.id).status == SUCCEEDED
    v2 = registry.get_version(tenant.id, "bot", 2)
    assert v2.parent_version_id == registry.get_version(tenant.id, "bot", 1).id
    suites = {r.suite for r in registry.eval_results(tenant.id, "bot", 2)}
    assert f"{TEST_SUITE}/production" in suites


def test_bad_data_fails_the_job_with_the_reason(
    store: JobStore, registry: Registry, tenant: Tenant, base: BaseModelRecord,
    chat_base: Path, tmp_path: Path,
) -> None:  # fmt: skip
    assert tenant.id is not None
    job = _submit(store, tenant, base, preference_records(5))
    _worker(store, base, chat_base, tmp_path).run_once()
    failed = store.get_job(tenant.id, job.id)
    assert failed.status == FAILED and failed.error is not None
    assert failed.error["code"] == "invalid_training_file"
    assert "a preference record in a supervised job" in failed.error["message"]
    assert registry.list_adapters(tenant.id) == []


class DiesBeforeFinishing(JobStore):
    """Fake store whose ``succeed`` kills the worker (a crash after registration)."""

    def succeed(self, job_id: str, worker_id: str, fine_tuned_model: str) -> bool:
        raise KeyboardInterrupt("worker killed between registration and success")


def test_a_crash_after_registration_is_finished_by_the_next_attempt(
    store: JobStore,
    registry: Registry,
    tenant: Tenant,
    base: BaseModelRecord,
    chat_base: Path,
    tmp_path: Path,
) -> None:
    assert tenant.id is not None
    job = _submit(store, tenant, base, fixed_answer_records(40))
    dying = DiesBeforeFinishing(registry, stale_after=60, max_attempts=3)
    with pytest.raises(KeyboardInterrupt):
        _worker(dying, base, chat_base, tmp_path).run_once()
    assert store.get_job(tenant.id, job.id).status == RUNNING
    assert len(registry.list_versions(tenant.id, "bot")) == 1
    assert store.reap(now=utcnow() + dt.timedelta(minutes=5)) == [job.id]
    _worker(store, base, chat_base, tmp_path).run_once()
    done = store.get_job(tenant.id, job.id)
    assert done.status == SUCCEEDED and done.attempts == 2
    assert len(registry.list_versions(tenant.id, "bot")) == 1
    metrics = [(r.suite, r.metric) for r in registry.eval_results(tenant.id, "bot", 1)]
    assert len(metrics) == len(set(metrics))  # eval results not stored twice
    messages = [e.message for e in store.events(tenant.id, job.id, limit=100)]
    assert any(m.startswith("Resuming: version 1 is already registered") for m in messages)


def _start_worker_process(
    database_url: str, blobs: Path, chat_base: Path, home: Path
) -> subprocess.Popen[bytes]:
    defaults = home / "defaults.json"
    home.mkdir(parents=True, exist_ok=True)
    config = {**FAST.to_json(), "method": "supervised"}
    defaults.write_text(json.dumps(config))
    env = {
        **os.environ,
        "LORAPLEX_HOME": str(home),
        "LORAPLEX_DATABASE_URL": database_url,
        "LORAPLEX_BLOB_URL": str(blobs),
        "LORAPLEX_BASE_MODEL": str(chat_base),
        "LORAPLEX_SERVED_MODEL_NAME": "tiny-chat",
        "LORAPLEX_BASE_REVISION": "r1",
    }
    command = [sys.executable, "-m", "server.worker_cli", "worker", "--once"]
    command += ["--heartbeat-interval", "0.2", "--defaults", str(defaults)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL)


def _wait_for_training(store: JobStore, tenant_id: int, job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store.checkpoints(tenant_id, job_id):
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not start training within {timeout} s")


def test_killing_a_worker_mid_job_leaves_no_version_and_the_job_recovers(
    store: JobStore,
    registry: Registry,
    tenant: Tenant,
    base: BaseModelRecord,
    chat_base: Path,
    database_url: str,
    tmp_path: Path,
) -> None:
    assert tenant.id is not None
    # Evaluating every step keeps the job in training long enough to be killed there.
    long = {"eval_every": 1, "epochs": 15}
    job = _submit(store, tenant, base, fixed_answer_records(40), hyperparameters=long)
    blobs = Path(registry.blobs.root)  # type: ignore[attr-defined]
    process = _start_worker_process(database_url, blobs, chat_base, tmp_path / "home")
    try:
        _wait_for_training(store, tenant.id, job.id, timeout=120)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    running = store.get_job(tenant.id, job.id)
    assert running.status == RUNNING and running.result is None
    assert registry.list_adapters(tenant.id) == []  # nothing half-registered
    assert store.reap(now=utcnow() + dt.timedelta(minutes=5)) == [job.id]
    assert store.get_job(tenant.id, job.id).status == QUEUED
    # The next worker trains it again from the start and registers exactly one version.
    _worker(store, base, chat_base, tmp_path).run_once()
    done = store.get_job(tenant.id, job.id)
    assert done.status == SUCCEEDED and done.attempts == 2
    assert [v.number for v in registry.list_versions(tenant.id, "bot")] == [1]
