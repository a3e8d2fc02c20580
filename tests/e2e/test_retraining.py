"""A scheduled retrain end to end on PostgreSQL, with a real `loraplex worker` process.

Tenant acme's adapter bot (v1 in production) has a dataset and captured answers its users
liked. A retraining policy runs every second; the worker's poll loop claims it, builds the
dataset's next version from the feedback, queues a job on it continuing v1's weights, and
trains it: the job succeeds and registers bot v2 with v1 as its parent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry import Actor, LocalBlobStore, Registry
from registry.captures import CaptureStore, FeedbackInput, NewCompletion
from registry.datasets import DatasetStore, NewExample, VersionChange
from registry.jobs import SUCCEEDED, FineTuningJob, JobStore
from registry.models import utcnow
from registry.retraining import PolicySpec, RetrainingStore
from tests.registry.registry_testdata import build_adapter, create_database, drop_database
from tests.training.training_testdata import FAST, build_tiny_chat_base, fixed_answer_records

REPO = Path(__file__).resolve().parents[2]
OPERATOR = Actor("test:operator", admin=True)
BASE, REVISION = "tiny-chat", "r1"


@pytest.fixture
def pg_registry(tmp_path: Path) -> Iterator[Registry]:
    url = create_database("loraplex_e2e_retraining")
    registry = Registry(url, LocalBlobStore(tmp_path / "blobs"))
    yield registry
    registry.close()
    drop_database(url)


def _completion(tenant_id: int, n: int) -> NewCompletion:
    return NewCompletion(
        tenant_id=tenant_id, completion_id=f"chatcmpl-{n}", model="bot", adapter="bot",
        version=1, route="production", user=f"user-{n % 3}", metadata={}, stream=False,
        prompt_tokens=5, completion_tokens=2, created_at=utcnow(),
        request={"model": "bot", "messages": [{"role": "user", "content": f"Question {n}?"}]},
        response={"choices": [{"message": {"role": "assistant", "content": f"Banana. {n}"}}]},
    )  # fmt: skip


def _setup(registry: Registry, base_dir: Path, tmp_path: Path) -> int:
    """acme, bot v1 in production, dataset support v1, and 12 liked answers of bot."""
    tenant_id = registry.create_tenant("acme", OPERATOR).id
    assert tenant_id is not None
    registry.register_base(base_dir, BASE, REVISION, OPERATOR)
    adapter = build_adapter(base_dir, tmp_path / "bot-v1", seed=1, r=4)
    registry.push_adapter(tenant_id, "bot", adapter, BASE, OPERATOR)
    registry.promote(tenant_id, "bot", 1, OPERATOR)
    datasets = DatasetStore(JobStore(registry))
    datasets.create(tenant_id, "support")
    records = fixed_answer_records(24)
    change = VersionChange(add=[NewExample(r, "file", "upload") for r in records])
    datasets.add_version(tenant_id, "support", change, OPERATOR)
    captures = CaptureStore(registry)
    captures.save([_completion(tenant_id, n) for n in range(12)])
    for n in range(12):
        captures.add_feedback(tenant_id, f"chatcmpl-{n}", FeedbackInput(thumbs="up"))
    return tenant_id


def _worker(registry: Registry, base_dir: Path, home: Path) -> subprocess.Popen[bytes]:
    home.mkdir(parents=True, exist_ok=True)
    defaults = home / "defaults.json"
    defaults.write_text(json.dumps(FAST.to_json()))
    env = {
        **os.environ,
        "LORAPLEX_HOME": str(home),
        "LORAPLEX_DATABASE_URL": registry.database.url.render_as_string(hide_password=False),
        "LORAPLEX_BLOB_URL": str(registry.blobs.root),  # type: ignore[attr-defined]
        "LORAPLEX_BASE_MODEL": str(base_dir),
        "LORAPLEX_SERVED_MODEL_NAME": BASE,
        "LORAPLEX_BASE_REVISION": REVISION,
    }
    command = [sys.executable, "-m", "server.cli.worker_commands", "worker"]
    command += [
        "--poll-interval",
        "0.2",
        "--heartbeat-interval",
        "0.5",
        "--defaults",
        str(defaults),
    ]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL)


def _finished_job(store: RetrainingStore, tenant_id: int, timeout: float) -> FineTuningJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = store.get_policy(tenant_id, "bot").row.last_job
        if last is not None:
            job = store.jobs.get_job(tenant_id, last)
            if job.status in ("succeeded", "failed", "cancelled"):
                return job
        time.sleep(0.5)
    raise AssertionError(f"the policy's job did not finish within {timeout} s")


def test_a_scheduled_policy_retrains_the_adapter_through_a_worker(
    pg_registry: Registry, tmp_path: Path
) -> None:
    base_dir = build_tiny_chat_base(tmp_path / "base")
    tenant_id = _setup(pg_registry, base_dir, tmp_path)
    store = RetrainingStore(JobStore(pg_registry))
    hyperparameters = {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1}
    spec = PolicySpec("support", every_seconds=1, hyperparameters=hyperparameters)
    store.set_policy(tenant_id, "bot", spec, OPERATOR)
    time.sleep(1.1)  # due when the worker's first tick looks
    worker = _worker(pg_registry, base_dir, tmp_path / "home")
    try:
        job = _finished_job(store, tenant_id, timeout=300)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert job.status == SUCCEEDED, job.error
    latest = DatasetStore(store.jobs).get_version(tenant_id, "support")
    assert latest.number == 2 and latest.example_count == 24 + 12  # made from the feedback
    v1 = pg_registry.get_version(tenant_id, "bot", 1)
    assert (job.dataset_version_id, job.init_version_id) == (latest.id, v1.id)
    assert job.adapter_name == "bot" and job.result is not None
    assert job.result["config"]["r"] == 4  # v1's shape, continued
    (v2,) = [v for v in pg_registry.list_versions(tenant_id, "bot") if v.training_job == job.id]
    assert v2.number == 2 and v2.parent_version_id == v1.id
    messages = [e.message for e in store.jobs.events(tenant_id, job.id, limit=100)]
    assert any(m.startswith("Created by the retraining policy of bot") for m in messages)
    assert any(m.startswith("Starting from bot version 1's weights") for m in messages)
