"""The job worker: a job ends as one registered, evaluated, promoted version, or as none.

Includes killing a real worker process mid-training (no partial version; the job is
re-queued and a second worker finishes it) and a crash between registration and the
final status (the re-run finishes without training or registering again).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from registry import AdapterVersion, NotFound
from registry.jobs import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    FineTuningJob,
    JobStore,
)
from registry.models import utcnow
from tests import reliability
from tests.training.conftest import Bench
from tests.training.training_testdata import FAST, fixed_answer_records, jsonl, preference_records
from training.worker import TEST_SUITE

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def _later() -> dt.datetime:
    """A time at which every current heartbeat is stale."""
    return utcnow() + dt.timedelta(minutes=5)


def test_a_job_ends_as_a_registered_evaluated_promoted_version(bench: Bench) -> None:
    registry, tenant_id = bench.registry, bench.tenant_id
    job = bench.submit(fixed_answer_records(60))
    assert bench.worker().run_once() is not None
    done = bench.job(job.id)
    assert done.status == SUCCEEDED, done.error
    assert done.fine_tuned_model == "bot" and done.result is not None
    (version,) = registry.list_versions(tenant_id, "bot")
    assert version.training_job == job.id and version.seed == 7
    assert version.dataset_sha256 == bench.store.get_file(tenant_id, job.training_file).sha256
    assert version.training_config_sha256 == done.result["config_sha256"]
    assert {"torch", "transformers", "peft"} <= set(version.library_versions)
    assert registry.aliases(tenant_id, "bot")["production"].version == 1
    stored = {(r.suite, r.metric): r for r in registry.eval_results(tenant_id, "bot", 1)}
    assert {(TEST_SUITE, "loss"), (TEST_SUITE, "exact_match")} <= set(stored)
    assert (f"{TEST_SUITE}/base", "loss") in stored
    assert stored[(TEST_SUITE, "loss")].value < stored[(f"{TEST_SUITE}/base", "loss")].value
    assert stored[(TEST_SUITE, "loss")].sample_count == done.result["test_samples"]
    messages = [e.message for e in reversed(bench.store.events(tenant_id, job.id, limit=100))]
    assert messages[-1] == "Job succeeded"
    assert any(m.startswith("Data audit: 60 examples") for m in messages)
    assert bench.store.checkpoints(tenant_id, job.id)
    assert not (bench.work_dir / job.id).exists()  # scratch cleaned up


def test_retraining_compares_with_production_and_records_the_parent(bench: Bench) -> None:
    registry, tenant_id = bench.registry, bench.tenant_id
    worker = bench.worker()
    bench.submit(fixed_answer_records(40))
    worker.run_once()
    second = bench.submit(fixed_answer_records(40, "Cherry."))
    worker.run_once()
    assert bench.job(second.id).status == SUCCEEDED
    v2 = registry.get_version(tenant_id, "bot", 2)
    assert v2.parent_version_id == registry.get_version(tenant_id, "bot", 1).id
    suites = {r.suite for r in registry.eval_results(tenant_id, "bot", 2)}
    assert f"{TEST_SUITE}/production" in suites


def test_bad_data_fails_the_job_with_the_reason(bench: Bench) -> None:
    job = bench.submit(preference_records(5))
    bench.worker().run_once()
    failed = bench.job(job.id)
    assert failed.status == FAILED and failed.error is not None
    assert failed.error["code"] == "invalid_training_file"
    assert "a preference record in a supervised job" in failed.error["message"]
    assert bench.registry.list_adapters(bench.tenant_id) == []


class DiesBeforeFinishing(JobStore):
    """Fake store whose ``succeed`` kills the worker (a crash after registration)."""

    def succeed(self, job_id: str, worker_id: str, fine_tuned_model: str) -> bool:
        raise KeyboardInterrupt("worker killed between registration and success")


def test_a_crash_after_registration_is_finished_by_the_next_attempt(bench: Bench) -> None:
    registry, tenant_id = bench.registry, bench.tenant_id
    job = bench.submit(fixed_answer_records(40))
    dying = DiesBeforeFinishing(registry, stale_after=60, max_attempts=3)
    with pytest.raises(KeyboardInterrupt):
        bench.worker(dying).run_once()
    assert bench.job(job.id).status == RUNNING
    assert len(registry.list_versions(tenant_id, "bot")) == 1
    assert bench.store.reap(now=_later()) == [job.id]
    bench.worker().run_once()
    done = bench.job(job.id)
    assert done.status == SUCCEEDED and done.attempts == 2
    assert len(registry.list_versions(tenant_id, "bot")) == 1
    metrics = [(r.suite, r.metric) for r in registry.eval_results(tenant_id, "bot", 1)]
    assert len(metrics) == len(set(metrics))  # eval results not stored twice
    messages = [e.message for e in bench.store.events(tenant_id, job.id, limit=100)]
    assert any(m.startswith("Resuming: version 1 is already registered") for m in messages)


def _start_worker_process(
    bench: Bench, database_url: str, home: Path, args: tuple[str, ...] = ("--once",)
) -> subprocess.Popen[bytes]:
    home.mkdir(parents=True, exist_ok=True)
    defaults = home / "defaults.json"
    defaults.write_text(json.dumps(FAST.to_json()))
    env = {
        **os.environ,
        "LORAPLEX_HOME": str(home),
        "LORAPLEX_DATABASE_URL": database_url,
        "LORAPLEX_BLOB_URL": str(bench.registry.blobs.root),  # type: ignore[attr-defined]
        "LORAPLEX_BASE_MODEL": str(bench.chat_base),
        "LORAPLEX_SERVED_MODEL_NAME": bench.base.name,
        "LORAPLEX_BASE_REVISION": bench.base.revision,
    }
    command = [sys.executable, "-m", "server.worker_cli", "worker", *args]
    command += ["--heartbeat-interval", "0.2", "--defaults", str(defaults)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL)


def _wait_for_training(bench: Bench, job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bench.store.checkpoints(bench.tenant_id, job_id):
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not start training within {timeout} s")


def test_killing_a_worker_mid_job_leaves_no_version_and_the_job_recovers(
    bench: Bench, database_url: str, tmp_path: Path
) -> None:
    # Evaluating every step keeps the job in training long enough to be killed there.
    long = {"eval_every": 1, "epochs": 15}
    job = bench.submit(fixed_answer_records(40), hyperparameters=long)
    process = _start_worker_process(bench, database_url, tmp_path / "home")
    try:
        _wait_for_training(bench, job.id, timeout=120)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    running = bench.job(job.id)
    assert running.status == RUNNING and running.result is None
    assert bench.registry.list_adapters(bench.tenant_id) == []  # nothing half-registered
    assert bench.store.reap(now=_later()) == [job.id]
    assert bench.job(job.id).status == QUEUED
    # The next worker trains it again from the start and registers exactly one version.
    bench.worker().run_once()
    done = bench.job(job.id)
    assert done.status == SUCCEEDED and done.attempts == 2
    assert [v.number for v in bench.registry.list_versions(bench.tenant_id, "bot")] == [1]


KILLS = 20


MILESTONES = ("claimed", "Data audit", "Step", "Registered", "Promoted")
"""Points of a job after which a kill lands (plus a random delay): claim, data prepared,
training under way, version registered, version promoted (the job not yet succeeded)."""


def _kill_at_a_random_moment(
    bench: Bench, database_url: str, home: Path, rng: random.Random
) -> str:
    """Start a worker, SIGKILL it a random moment after a random milestone of its job.

    Milestones rather than wall-clock delays, so the kills spread over the job's
    phases however loaded the machine is; each worker dies within its first job.
    """
    # --stale-after 1: the next worker re-queues what this one held at once.
    worker_id = f"doomed-{rng.randrange(1 << 30)}"
    args = ("--stale-after", "1", "--max-attempts", "50", "--poll-interval", "0.2")
    milestone = rng.choice(MILESTONES)
    process = _start_worker_process(bench, database_url, home, (*args, "--worker-id", worker_id))
    try:
        job = _wait_for(lambda: next(iter(_running(bench, worker_id)), None), process)
        if milestone != "claimed":
            # A resumed job skips what an earlier attempt did: then its end is the moment.
            seen = _event_count(bench, job.id, milestone)

            def passed() -> str | None:
                if _event_count(bench, job.id, milestone) > seen:
                    return milestone
                held = any(j.id == job.id for j in _running(bench, worker_id))
                return None if held else "job end"

            milestone = _wait_for(passed, process)
        time.sleep(rng.uniform(0, 0.5))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        return milestone
    finally:
        process.kill()


def _wait_for(probe: Callable[[], T | None], process: subprocess.Popen[bytes]) -> T:
    deadline = time.monotonic() + 120
    while (found := probe()) is None:
        assert process.poll() is None, "the worker exited on its own"
        assert time.monotonic() < deadline, "the worker made no progress in 120 s"
        time.sleep(0.02)
    return found


def _event_count(bench: Bench, job_id: str, prefix: str) -> int:
    events = bench.store.events(bench.tenant_id, job_id, limit=1000)
    return sum(e.message.startswith(prefix) for e in events)


def _running(bench: Bench, worker_id: str) -> list[FineTuningJob]:
    """Jobs this worker holds now (not ones a killed worker left behind)."""
    jobs = bench.store.list_jobs(bench.tenant_id, limit=100)
    return [j for j in jobs if j.status == RUNNING and j.worker_id == worker_id]


def _versions(bench: Bench, adapter: str) -> list[AdapterVersion]:
    """The adapter's versions; none before its first registration."""
    try:
        return bench.registry.list_versions(bench.tenant_id, adapter)
    except NotFound:
        return []


def _half_registered(bench: Bench) -> list[str]:
    """Versions lacking their blob, fingerprint, job success or eval results."""
    jobs = {j.id: j for j in bench.store.list_jobs(bench.tenant_id, limit=100)}
    problems = []
    for adapter in bench.registry.list_adapters(bench.tenant_id):
        for v in bench.registry.list_versions(bench.tenant_id, adapter.name):
            label = f"{adapter.name}@{v.number}"
            job = jobs.get(v.training_job or "")
            evals = bench.registry.eval_results(bench.tenant_id, adapter.name, v.number)
            if not bench.registry.blobs.exists(v.blob_key):
                problems.append(f"{label}: blob missing")
            if len(v.fingerprint) != 64:
                problems.append(f"{label}: no fingerprint")
            if job is None or job.status != SUCCEEDED:
                problems.append(f"{label}: its job did not succeed")
            if not any(r.suite == TEST_SUITE for r in evals):
                problems.append(f"{label}: no eval results")
    return problems


@pytest.mark.reliability
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_workers_killed_at_20_random_moments_leave_no_half_registered_version(
    bench: Bench, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(20)
    answers = ["Banana.", "Cherry.", "Kiwi.", "Mango."]

    def submit(i: int) -> FineTuningJob:
        records = fixed_answer_records(40, answers[i % 4])
        return bench.submit(records, adapter=("bot", "helper")[i % 2], seed=i)

    # Each kill lets at most one job finish (most lose theirs): 12 jobs never run out.
    jobs = [submit(i) for i in range(12)]
    phases = [
        _kill_at_a_random_moment(bench, database_url, tmp_path / "home", rng) for _ in range(KILLS)
    ]
    # A last worker, left alone, finishes whatever the kills left behind.
    finisher = bench.worker(JobStore(bench.registry, stale_after=0, max_attempts=50))
    while finisher.run_once() is not None:
        pass

    final = [bench.job(j.id) for j in jobs]
    unclean = [
        j.id
        for j in final
        if not (j.status == SUCCEEDED and j.fine_tuned_model)
        and not (j.status == FAILED and j.error and j.error.get("message"))
    ]
    half = _half_registered(bench)
    versions_per_job = [
        sum(v.training_job == j.id for v in _versions(bench, j.adapter_name))
        for j in final
        if j.status == SUCCEEDED
    ]
    reliability.record(
        "faults",
        f"training worker SIGKILLed at {len(phases)} random moments over {len(jobs)} jobs",
        len(phases),
        "kills",
        len(half) + len(unclean) + sum(n != 1 for n in versions_per_job),
        "half-registered versions or jobs not ended cleanly",
    )
    with capsys.disabled():
        print(
            f"\n[worker kills] after: {dict(Counter(phases))}; "
            f"jobs: {dict(Counter(j.status for j in final))}, "
            f"attempts {[j.attempts for j in final]}"
        )
    assert half == [] and unclean == []
    assert versions_per_job and all(n == 1 for n in versions_per_job)


def test_dpo_jobs_with_a_validation_file_and_a_schema(bench: Bench) -> None:
    registry, tenant_id = bench.registry, bench.tenant_id
    validation = bench.store.create_file(
        tenant_id, "valid.jsonl", "fine-tune", jsonl(preference_records(7))
    )
    job = bench.submit(
        [{**r, "prompt": f"Other {r['prompt']}"} for r in preference_records(50)],
        adapter="dpo-bot",
        method="dpo",
        validation_file=validation.id,
        json_schema={"type": "object"},
    )
    bench.worker().run_once()
    done = bench.job(job.id)
    assert done.status == SUCCEEDED, done.error
    assert done.result is not None and done.result["config"]["method"] == "dpo"
    audit = next(
        e for e in bench.store.events(tenant_id, job.id, limit=100) if e.data and "splits" in e.data
    )
    assert audit.data is not None and audit.data["splits"]["validation"] == 7
    stored = {(r.suite, r.metric) for r in registry.eval_results(tenant_id, "dpo-bot", 1)}
    assert (TEST_SUITE, "format_compliance") in stored
    assert (f"{TEST_SUITE}/base", "format_compliance") in stored


def test_cancelling_a_running_job_stops_training_and_registers_nothing(bench: Bench) -> None:
    job = bench.submit(fixed_answer_records(40), hyperparameters={"eval_every": 1, "epochs": 30})
    worker = threading.Thread(target=bench.worker().run_once)
    worker.start()
    try:
        _wait_for_training(bench, job.id, timeout=60)
        bench.store.cancel(bench.tenant_id, job.id)
    finally:
        worker.join(timeout=60)
    assert not worker.is_alive()
    assert bench.job(job.id).status == CANCELLED
    assert bench.registry.list_adapters(bench.tenant_id) == []
