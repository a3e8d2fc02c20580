"""Retraining policies on SQLite and PostgreSQL: setting them (tenant-scoped), claiming due
ones exactly once with many claimers, and runs that queue a job on the dataset's latest
version (from the adapter's feedback), continuing production or from scratch, or skip."""

from __future__ import annotations

import datetime as dt
import json
import threading
from typing import Any

import pytest
from registry_testdata import BASE_NAME

from registry import Actor, AdapterVersion, InvalidRequest, NotFound, Registry, Tenant
from registry.captures import CaptureStore, FeedbackInput, NewCompletion
from registry.datasets import DatasetStore, NewExample, VersionChange
from registry.jobs import JobStore
from registry.models import utcnow
from registry.retraining import PolicySpec, RetrainingStore

OPERATOR = Actor("cli:test", admin=True)


def chat(question: str, answer: str) -> dict[str, Any]:
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": turns}


@pytest.fixture
def store(registry: Registry) -> RetrainingStore:
    return RetrainingStore(JobStore(registry))


@pytest.fixture
def bot(registry: Registry, tenant: Tenant, bot_v1: AdapterVersion) -> int:
    """Tenant acme with adapter bot (v1 in production) and dataset support (one version)."""
    assert tenant.id is not None
    registry.promote(tenant.id, "bot", 1, OPERATOR)
    jobs = JobStore(registry)
    datasets = DatasetStore(jobs)
    datasets.create(tenant.id, "support")
    content = "".join(json.dumps(chat(f"q{i}", "a")) + "\n" for i in range(3)).encode()
    upload = jobs.create_file(tenant.id, "data.jsonl", "fine-tune", content)
    examples = [NewExample(chat(f"q{i}", "a"), "file", upload.id) for i in range(3)]
    datasets.add_version(tenant.id, "support", VersionChange(add=examples), OPERATOR)
    return tenant.id


def _completion(tenant_id: int, n: int, adapter: str = "bot") -> NewCompletion:
    return NewCompletion(
        tenant_id=tenant_id, completion_id=f"chatcmpl-{n}", model=adapter, adapter=adapter,
        version=1, route="production", user=None, metadata={}, stream=False, prompt_tokens=3,
        completion_tokens=1, created_at=utcnow(),
        request={"model": adapter, "messages": [{"role": "user", "content": f"question {n}"}]},
        response={"choices": [{"message": {"role": "assistant", "content": f"answer {n}"}}]},
    )  # fmt: skip


def _liked(registry: Registry, tenant_id: int, n: int, adapter: str = "bot") -> None:
    captures = CaptureStore(registry)
    captures.save([_completion(tenant_id, n, adapter)])
    captures.add_feedback(tenant_id, f"chatcmpl-{n}", FeedbackInput(thumbs="up"))


def test_a_policy_is_set_shown_replaced_and_deleted(store: RetrainingStore, bot: int) -> None:
    spec = PolicySpec("support", every_seconds=3600, hyperparameters={"n_epochs": 2})
    policy = store.set_policy(bot, "bot", spec, OPERATOR)
    assert (policy.adapter, policy.dataset, policy.row.every_seconds) == ("bot", "support", 3600)
    assert policy.row.next_run_at is not None
    replaced = store.set_policy(bot, "bot", PolicySpec("support", after_feedback=5), OPERATOR)
    assert replaced.row.id == policy.row.id and replaced.row.next_run_at is None
    assert [p.adapter for p in store.list_policies(bot)] == ["bot"]
    store.delete_policy(bot, "bot", OPERATOR)
    with pytest.raises(NotFound, match="has no retraining policy"):
        store.get_policy(bot, "bot")


def test_a_foreign_adapter_is_answered_like_an_unknown_one(
    store: RetrainingStore, registry: Registry, bot: int
) -> None:
    store.set_policy(bot, "bot", PolicySpec("support", every_seconds=60), OPERATOR)
    other = registry.create_tenant("globex", OPERATOR).id
    assert other is not None
    spec = PolicySpec("support", every_seconds=9)
    errors = []
    for adapter in ("bot", "nope"):
        calls = (
            lambda name: store.get_policy(other, name),
            lambda name: store.delete_policy(other, name, OPERATOR),
            lambda name: store.claim_now(other, name),
            lambda name: store.set_policy(other, name, spec, OPERATOR),
        )
        for call in calls:
            with pytest.raises(NotFound) as caught:
                call(adapter)
            errors.append(str(caught.value).replace(adapter, "X"))
    assert errors[:4] == errors[4:]
    with pytest.raises(NotFound):  # PostgreSQL refuses NULs in queries: never a 500
        store.get_policy(bot, "b\x00t")


def test_a_policy_without_a_trigger_or_with_a_bad_one_is_refused(
    store: RetrainingStore, bot: int
) -> None:
    with pytest.raises(InvalidRequest, match="needs a trigger"):
        store.set_policy(bot, "bot", PolicySpec("support"), OPERATOR)
    with pytest.raises(InvalidRequest, match="after_feedback must be from 1 to"):
        store.set_policy(bot, "bot", PolicySpec("support", after_feedback=0), OPERATOR)
    with pytest.raises(NotFound, match="dataset 'nope' does not exist"):
        store.set_policy(bot, "bot", PolicySpec("nope", every_seconds=5), OPERATOR)


def test_a_timed_policy_is_claimed_once_when_due(store: RetrainingStore, bot: int) -> None:
    store.set_policy(bot, "bot", PolicySpec("support", every_seconds=60), OPERATOR)
    now = utcnow()
    assert store.due(now) == []
    later = now + dt.timedelta(seconds=61)
    claims: list[str] = []
    lock = threading.Lock()

    def claim() -> None:
        found = RetrainingStore(store.jobs).due(later)
        with lock:
            claims.extend(p.adapter for p in found)

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert claims == ["bot"]
    assert store.due(later + dt.timedelta(seconds=59)) == []
    assert [p.adapter for p in store.due(later + dt.timedelta(seconds=61))] == ["bot"]


def test_a_run_queues_a_job_continuing_production_then_skips_an_unchanged_dataset(
    store: RetrainingStore, bot: int, bot_v1: AdapterVersion, registry: Registry
) -> None:
    spec = PolicySpec("support", every_seconds=1, hyperparameters={"n_epochs": 1}, seed=4)
    store.set_policy(bot, "bot", spec, OPERATOR)
    (first,) = store.tick(utcnow() + dt.timedelta(seconds=2))
    assert first.job is not None, first.message
    job = first.job
    latest = DatasetStore(store.jobs).get_version(bot, "support")
    assert (job.adapter_name, job.training_file, job.dataset_version_id) == (
        "bot", latest.file_id, latest.id
    )  # fmt: skip
    assert job.init_version_id == bot_v1.id and job.suffix is None
    assert (job.hyperparameters, job.seed, job.status) == ({"n_epochs": 1}, 4, "queued")
    base = registry.find_base(BASE_NAME)
    assert base is not None and job.base_fingerprint == base.fingerprint
    policy = store.get_policy(bot, "bot")
    assert (policy.row.last_job, policy.last_dataset_version) == (job.id, 1)
    (second,) = store.tick(utcnow() + dt.timedelta(seconds=4))
    assert second.job is None
    assert second.message.startswith("Skipped: dataset 'support' version 1 is unchanged")
    assert store.get_policy(bot, "bot").row.last_outcome == second.message


def test_feedback_triggers_a_run_on_a_version_made_from_it(
    store: RetrainingStore, bot: int, registry: Registry
) -> None:
    _liked(registry, bot, 0)  # before the policy: not new
    spec = PolicySpec("support", after_feedback=2, start_from="scratch")
    store.set_policy(bot, "bot", spec, OPERATOR)
    _liked(registry, bot, 1)
    _liked(registry, bot, 2, adapter="other")  # another adapter's answers do not count
    assert store.due() == []
    _liked(registry, bot, 3)
    (outcome,) = store.tick()
    assert outcome.job is not None, outcome.message
    latest = DatasetStore(store.jobs).get_version(bot, "support")
    assert latest.number == 2 and latest.example_count == 3 + 3  # the liked answers of bot
    assert outcome.job.dataset_version_id == latest.id and outcome.job.init_version_id is None
    assert "made dataset 'support' version 2 from feedback" in outcome.message
    assert store.due() == []  # the feedback it ran on is not new any more


def test_run_now_runs_a_disabled_policy(store: RetrainingStore, bot: int) -> None:
    spec = PolicySpec("support", every_seconds=1, enabled=False)
    store.set_policy(bot, "bot", spec, OPERATOR)
    assert store.due(utcnow() + dt.timedelta(seconds=5)) == []
    outcome = store.run_claimed(store.claim_now(bot, "bot"))
    assert outcome.job is not None and outcome.job.init_version_id is not None
