"""The job worker: a job ends as one registered, evaluated, promoted version, or as none.

Includes a kill at each named moment of a job (in process, and a real SIGKILL inside the
completing transaction on both databases), a worker whose job was reaped under it, a
real worker process killed mid-training, and workers SIGKILLed at random moments.
"""

from __future__ import annotations

import dataclasses
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
import sqlalchemy.exc

from registry import PRODUCTION, AdapterVersion, LocalBlobStore, NotFound
from registry.jobs import (
    CANCELLED,
    FAILED,
    PAUSED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    FineTuningJob,
    JobStore,
)
from registry.models import utcnow
from tests import reliability
from tests.training.conftest import Bench
from tests.training.dying import MOMENTS, DyingRegistry, DyingStore, Killed, kill_at
from tests.training.training_testdata import FAST, fixed_answer_records, jsonl, preference_records
from training.worker import TEST_SUITE, Worker

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


def _own_versions(bench: Bench, job: FineTuningJob) -> list[AdapterVersion]:
    return [v for v in _versions(bench, job.adapter_name) if v.training_job == job.id]


def _production(bench: Bench, adapter: str) -> int:
    return bench.registry.aliases(bench.tenant_id, adapter)[PRODUCTION].version


def _retry(bench: Bench, job: FineTuningJob) -> FineTuningJob:
    """What the next worker does with a killed worker's job: re-queue it and run it."""
    assert bench.store.reap(now=_later()) == [job.id]
    bench.worker().run_once()
    return bench.job(job.id)


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_kill_at_any_moment_leaves_all_of_the_job_or_none_for_one_retry(
    bench: Bench, database_url: str, moment: str
) -> None:
    bench.submit(fixed_answer_records(40))
    bench.worker().run_once()  # version 1 in production: the job compares with it, moves it
    job = bench.submit(fixed_answer_records(40, "Cherry."), seed=8)
    dying = DyingRegistry(database_url, bench.registry.blobs, kill_at(moment))
    try:
        with pytest.raises(Killed):
            bench.worker(DyingStore(dying)).run_once()
    finally:
        dying.close()
    killed = bench.job(job.id)
    if moment == "completed":
        assert killed.status == SUCCEEDED and len(_own_versions(bench, job)) == 1
        assert bench.store.reap(now=_later()) == []
        done = killed
    else:
        assert killed.status == RUNNING and _own_versions(bench, job) == []
        assert _production(bench, "bot") == 1  # nothing of the job: no version, no promotion
        done = _retry(bench, job)
    assert done.status == SUCCEEDED, done.error
    assert done.attempts == (1 if moment == "completed" else 2)
    (version,) = _own_versions(bench, job)
    assert done.fine_tuned_model == "bot" and _production(bench, "bot") == version.number
    results = bench.registry.eval_results(bench.tenant_id, "bot", version.number)
    scores = [(r.suite, r.metric) for r in results]
    assert (TEST_SUITE, "loss") in scores and len(scores) == len(set(scores))


def test_a_sigkill_inside_the_completing_transaction_rolls_all_of_it_back(
    bench: Bench, database_url: str
) -> None:
    """A real process kill with the version's row written and not committed: the
    database (PostgreSQL: the dropped connection; SQLite: the journal) keeps none of it."""
    job = bench.submit(fixed_answer_records(40))
    blobs: LocalBlobStore = bench.registry.blobs  # type: ignore[assignment]
    args = [database_url, str(blobs.root), str(bench.chat_base), bench.base.fingerprint]
    command = [sys.executable, "-m", "tests.training.dying", *args, str(bench.work_dir)]
    command.append("registering")
    died = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, timeout=300)
    assert died.returncode == -signal.SIGKILL
    killed = bench.job(job.id)
    assert killed.status == RUNNING and killed.result is None
    assert bench.registry.list_adapters(bench.tenant_id) == []
    assert (bench.work_dir / job.id / "adapter").is_dir()  # its scratch is left behind
    done = _retry(bench, job)  # in that same scratch directory
    assert done.status == SUCCEEDED and done.attempts == 2, done.error
    assert [v.number for v in _own_versions(bench, job)] == [1]


def test_a_worker_whose_job_was_reaped_under_it_writes_nothing(
    bench: Bench, database_url: str
) -> None:
    """Its heartbeats stalled, another worker took the job over: the first one's
    completion is refused whole, and the job's new holder finishes it."""
    job = bench.submit(fixed_answer_records(40))
    taken: list[FineTuningJob] = []

    def take_over(moment: str) -> None:
        if moment == "staged":  # trained and staged, about to complete
            assert bench.store.reap(now=_later()) == [job.id]
            claimed = bench.store.claim("second-worker", [bench.base.fingerprint])
            assert claimed is not None
            taken.append(claimed)

    stalled = DyingRegistry(database_url, bench.registry.blobs, take_over)
    # No heartbeat at all (its thread stalled): only the completion itself can notice.
    options = dataclasses.replace(bench.worker().options, heartbeat_interval=3600)
    try:
        Worker(DyingStore(stalled), options, "test-worker").run_once()
    finally:
        stalled.close()
    assert [t.id for t in taken] == [job.id]
    held = bench.job(job.id)
    assert (held.status, held.worker_id, held.result) == (RUNNING, "second-worker", None)
    assert bench.registry.list_adapters(bench.tenant_id) == []
    messages = [e.message for e in bench.store.events(bench.tenant_id, job.id, limit=100)]
    assert not any(m.startswith("Registered") for m in messages)
    second = Worker(bench.store, bench.worker().options, "second-worker")
    second.process(taken[0])
    done = bench.job(job.id)
    assert done.status == SUCCEEDED and [v.number for v in _own_versions(bench, job)] == [1]


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
    command = [sys.executable, "-m", "server.cli.worker_commands", "worker", *args]
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


MILESTONES = ("claimed", "Data audit", "Step", "Training finished")
"""Points of a job after which a kill lands (plus a random delay): claim, data prepared,
training under way, training done (evaluating, staging the blob, completing)."""


def _kill_at_a_random_moment(
    bench: Bench, database_url: str, home: Path, rng: random.Random
) -> str:
    """Start a worker, SIGKILL it a random moment after a random milestone of its job.

    Milestones rather than wall-clock delays, so the kills spread over the job's
    phases however loaded the machine is; each worker dies within its first job.
    """
    # --stale-after 1: the next worker re-queues what this one held at once. --once: a
    # worker whose kill lands after its job ended must not go on to finish more (on a
    # fast machine a job takes under a second, and the jobs ran out before the kills).
    worker_id = f"doomed-{rng.randrange(1 << 30)}"
    args = ("--once", "--stale-after", "1", "--max-attempts", "50", "--poll-interval", "0.2")
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

    # Each doomed worker takes one job at most, so one job per kill never runs out.
    jobs = [submit(i) for i in range(KILLS)]
    phases = [
        _kill_at_a_random_moment(bench, database_url, tmp_path / "home", rng) for _ in range(KILLS)
    ]
    # A last worker, left alone, finishes whatever the kills left behind.
    finisher = bench.worker(JobStore(bench.registry, stale_after=0, max_attempts=50))
    while finisher.run_once() is not None:
        pass

    final = [bench.job(j.id) for j in jobs]
    # Every job's data is valid: a job that did not succeed was undone by a kill.
    failed = {j.id: j.error for j in final if j.status == FAILED}
    unfinished = [j.id for j in final if not (j.status == SUCCEEDED and j.fine_tuned_model)]
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
        len(half) + len(unfinished) + sum(n != 1 for n in versions_per_job),
        "half-registered versions or jobs not ended cleanly",
    )
    with capsys.disabled():
        print(
            f"\n[worker kills] after: {dict(Counter(phases))}; "
            f"jobs: {dict(Counter(j.status for j in final))}, "
            f"attempts {[j.attempts for j in final]}; failed: {failed}"
        )
    assert failed == {}, f"jobs failed under the kills: {failed}"
    assert half == [] and unfinished == []
    assert all(n == 1 for n in versions_per_job)


def _database_down(*_: object, **__: object) -> bool:
    """A narrow fake of what the driver raises while PostgreSQL restarts."""
    raise sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("server closed the connection"))


def test_a_registry_outage_mid_job_leaves_it_for_a_retry_and_the_worker_alive(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = bench.submit(fixed_answer_records(60))
    worker = bench.worker()
    with monkeypatch.context() as outage:  # down from the first heartbeat to the end
        for name in ("heartbeat", "add_checkpoint", "add_event", "complete", "fail"):
            outage.setattr(bench.store, name, _database_down)
        assert worker.run_once() is not None  # neither raised nor failed the job
    assert bench.job(job.id).status == RUNNING  # the reaper's to give another attempt
    assert bench.store.reap(now=_later()) == [job.id]
    assert bench.worker().run_once() is not None
    assert bench.job(job.id).status == SUCCEEDED

    stop, polls = threading.Event(), []

    def claim_during_an_outage(*_: object) -> None:
        polls.append(1)
        if len(polls) == 3:
            stop.set()
        _database_down()

    monkeypatch.setattr(bench.store, "claim", claim_during_an_outage)
    worker.run(stop)  # returns only because it was stopped: the outage never ended it
    assert len(polls) == 3


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


def _interrupted(bench: Bench, interrupt: Callable[[int, str], object]) -> FineTuningJob:
    """A long job, ``interrupt``-ed (tenant id, job id) once it trains; the worker must
    stop at its next heartbeat, not after 30 epochs."""
    job = bench.submit(fixed_answer_records(40), hyperparameters={"eval_every": 1, "epochs": 30})
    worker = threading.Thread(target=bench.worker().run_once)
    worker.start()
    try:
        _wait_for_training(bench, job.id, timeout=60)
        interrupt(bench.tenant_id, job.id)
    finally:
        worker.join(timeout=60)
    assert not worker.is_alive()
    return bench.job(job.id)


def test_cancelling_a_running_job_stops_training_and_registers_nothing(bench: Bench) -> None:
    assert _interrupted(bench, bench.store.cancel).status == CANCELLED
    assert bench.registry.list_adapters(bench.tenant_id) == []
    assert bench.registry.list_adapters(bench.tenant_id) == []


def test_pausing_a_running_job_stops_training_and_resuming_queues_it_from_the_start(
    bench: Bench,
) -> None:
    paused = job = _interrupted(bench, bench.store.pause)
    assert (paused.status, paused.attempts) == (PAUSED, 0)  # a pause is not a lost attempt
    assert bench.registry.list_adapters(bench.tenant_id) == []
    assert bench.worker().run_once() is None  # a paused job is not claimed
    assert bench.store.reap(_later()) == []  # nor reaped
    messages = [e.message for e in bench.store.events(bench.tenant_id, job.id, limit=100)]
    assert messages[0].startswith("Paused: training stopped on request at step ")
    assert "training restarts from the start" in messages[0]
    pause = "Job paused (running): its worker stops at its next heartbeat"
    assert any(m.startswith(pause) for m in messages)  # steps until then log after it
    assert bench.store.resume(bench.tenant_id, job.id).status == QUEUED
    claimed = bench.store.claim("w-next", [bench.base.fingerprint])
    assert claimed is not None and claimed.id == job.id and claimed.attempts == 1


STILL = {"learning_rate": 1e-12}
"""A learning rate that moves nothing: the adapter answers exactly as the base does."""


def _warnings(bench: Bench, job: FineTuningJob) -> list[str]:
    events = bench.store.events(bench.tenant_id, job.id, limit=100)
    return [e.message for e in events if e.level == "warn"]


def test_a_job_no_better_than_the_base_is_registered_but_not_promoted(bench: Bench) -> None:
    job = bench.submit(fixed_answer_records(60), hyperparameters=STILL)
    bench.worker().run_once()
    done = bench.job(job.id)
    assert done.status == SUCCEEDED, done.error
    assert done.fine_tuned_model == "bot@1"
    assert [v.number for v in _own_versions(bench, job)] == [1]
    assert PRODUCTION not in bench.registry.aliases(bench.tenant_id, "bot")
    (warning,) = _warnings(bench, job)
    samples = done.result["test_samples"] if done.result else 0
    assert warning.startswith("Not promoted: loss ") and f"on {samples} held-out" in warning
    assert warning.endswith("needs ≥ 5 % lower than base"), warning


def test_a_job_no_better_than_production_leaves_production_where_it_is(bench: Bench) -> None:
    worker = bench.worker()
    first = bench.submit(fixed_answer_records(60))
    worker.run_once()
    assert bench.job(first.id).fine_tuned_model == "bot"  # it learned: promoted
    again = bench.submit(fixed_answer_records(60), hyperparameters=STILL, seed=8)
    worker.run_once()
    done = bench.job(again.id)
    assert done.status == SUCCEEDED and done.fine_tuned_model == "bot@2", done.error
    assert _production(bench, "bot") == 1
    (warning,) = _warnings(bench, again)
    assert "production " in warning and warning.endswith("lower than both"), warning


def test_auto_hyperparameters_come_from_the_data_and_a_learning_rate_search(
    bench: Bench,
) -> None:
    options = dataclasses.replace(bench.worker().options, choose_hyperparameters=True)
    job = bench.submit(fixed_answer_records(60), hyperparameters={"n_epochs": "auto"})
    Worker(bench.store, options, "test-worker").run_once()
    done = bench.job(job.id)
    assert done.status == SUCCEEDED and done.result is not None, done.error
    chosen = done.result["hyperparameters"]
    tried = {t["learning_rate"]: t["valid_loss"] for t in chosen["search"]}
    assert len(tried) == 3 and chosen["learning_rate"] == min(tried, key=lambda r: tried[r])
    assert done.result["config"]["learning_rate"] == chosen["learning_rate"]
    assert (chosen["epochs"], chosen["batch_size"]) == (6, 4)  # a small set: more passes
    (event,) = [e for e in bench.store.events(bench.tenant_id, job.id, limit=200)
                if e.message.startswith("Hyperparameters: ")]  # fmt: skip
    assert event.data == chosen and "search" in event.message
    version = bench.registry.get_version(bench.tenant_id, "bot", 1)
    assert version.training_config_sha256 == done.result["config_sha256"]
