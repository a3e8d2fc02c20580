"""Erasure on SQLite and PostgreSQL: deleting a file, a stored completion or an end user's
records removes their examples from later dataset versions, answers the lineage (dataset
versions, adapter versions trained on them), and one call queues the retraining."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from registry_testdata import BASE_NAME

from registry import Actor, AdapterVersion, NotFound, Provenance, Registry, Tenant
from registry.captures import CaptureSettings, CaptureStore, FeedbackInput, NewCompletion
from registry.dataset_sources import CompletionFilter
from registry.datasets import DatasetStore, NewExample, VersionChange
from registry.erasures import ErasureStore, Subject
from registry.jobs import FineTuningJob, JobStore, new_id

OPERATOR = Actor("cli:test")


def chat(question: str, answer: str) -> dict[str, Any]:
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": turns}


def jsonl(*examples: dict[str, Any]) -> bytes:
    import json

    return "".join(json.dumps(e) + "\n" for e in examples).encode()


@pytest.fixture
def stores(registry: Registry) -> tuple[JobStore, DatasetStore, ErasureStore]:
    jobs = JobStore(registry)
    return jobs, DatasetStore(jobs), ErasureStore(jobs)


def _file_version(
    jobs: JobStore, datasets: DatasetStore, tenant_id: int, name: str, *examples: dict[str, Any]
) -> tuple[str, int]:
    """A file upload added to dataset ``name`` as its next version: (file id, version number)."""
    upload = jobs.create_file(tenant_id, "data.jsonl", "fine-tune", jsonl(*examples))
    change = VersionChange(add=[NewExample(e, "file", upload.id) for e in examples])
    version, _ = datasets.add_version(tenant_id, name, change, OPERATOR)
    return upload.id, version.number


def _trained_on(
    registry: Registry,
    jobs: JobStore,
    datasets: DatasetStore,
    tenant: Tenant,
    dataset: str,
    adapter_dir: Path,
) -> tuple[FineTuningJob, AdapterVersion]:
    """A succeeded job on the dataset's latest version and the version it registered."""
    assert tenant.id is not None
    version = datasets.get_version(tenant.id, dataset)
    base = registry.find_base(BASE_NAME)
    assert base is not None
    job = jobs.create_job(
        FineTuningJob(
            id=new_id("ftjob"),
            tenant_id=tenant.id,
            model=BASE_NAME,
            base_fingerprint=base.fingerprint,
            training_file=version.file_id,
            hyperparameters={"n_epochs": 2},
            adapter_name="bot",
            dataset_version_id=version.id,
            status="succeeded",
        )
    )
    provenance = Provenance(training_job=job.id)
    pushed = registry.push_adapter(tenant.id, "bot", adapter_dir, BASE_NAME, OPERATOR, provenance)
    return job, pushed


def test_erasing_a_file_reaches_its_versions_and_adapters_and_retrains_without_it(
    registry: Registry,
    base: Any,
    tenant: Tenant,
    adapters: dict[str, Path],
    stores: tuple[JobStore, DatasetStore, ErasureStore],
) -> None:
    jobs, datasets, erasures = stores
    assert tenant.id is not None
    datasets.create(tenant.id, "intents")
    kept, doomed = chat("hello", "greeting"), chat("refund please", "refund")
    first, _ = _file_version(jobs, datasets, tenant.id, "intents", kept)
    second, _ = _file_version(jobs, datasets, tenant.id, "intents", kept, doomed)
    job, trained = _trained_on(registry, jobs, datasets, tenant, "intents", adapters["v1"])

    erasure = erasures.erase(tenant.id, Subject("file", second), OPERATOR)

    assert erasure.lineage == {
        "examples": 1,  # ``kept`` came from the first file too: it is that file's data
        "dataset_versions": [{"dataset": "intents", "version": 2}],
        "adapter_versions": [{"adapter": "bot", "version": trained.number, "training_job": job.id}],
    }
    with pytest.raises(NotFound):
        jobs.get_file(tenant.id, second)
    assert jobs.get_file(tenant.id, first).deleted_at is None

    [retrain] = erasures.retrain(tenant.id, erasure.id, OPERATOR)
    latest = datasets.get_version(tenant.id, "intents")
    assert latest.number == 3 and [e for _, e in datasets.examples(latest)] == [kept]
    assert (retrain.training_file, retrain.dataset_version_id) == (latest.file_id, latest.id)
    assert (retrain.hyperparameters, retrain.adapter_name) == ({"n_epochs": 2}, "bot")
    assert retrain.init_version_id is None  # from the base: the old weights hold the data
    assert erasures.get(tenant.id, erasure.id).retrain_jobs == [retrain.id]
    events = registry.audit_log(tenant_id=tenant.id)
    assert any(e.action == "erase.file" and e.subject == second for e in events)


def _completion(tenant_id: int, n: int, user: str | None, answer: str) -> NewCompletion:
    return NewCompletion(
        tenant_id=tenant_id,
        completion_id=f"chatcmpl-{n}",
        model="bot",
        adapter="bot",
        version=1,
        route="production",
        user=user,
        metadata={},
        stream=False,
        prompt_tokens=3,
        completion_tokens=1,
        created_at=dt.datetime.now(dt.UTC),
        request={"model": "bot", "messages": [{"role": "user", "content": f"question {n}"}]},
        response={"choices": [{"message": {"role": "assistant", "content": answer}}]},
    )


def test_erasing_a_user_deletes_their_completions_and_keeps_everyone_elses(
    registry: Registry, tenant: Tenant, stores: tuple[JobStore, DatasetStore, ErasureStore]
) -> None:
    _, datasets, erasures = stores
    assert tenant.id is not None
    captures = CaptureStore(registry)
    captures.set_settings(tenant.id, CaptureSettings(enabled=True), OPERATOR)
    captures.save(
        [_completion(tenant.id, 1, "alice", "a1"), _completion(tenant.id, 2, "bob", "b2")]
    )
    for n in (1, 2):
        captures.add_feedback(tenant.id, f"chatcmpl-{n}", FeedbackInput(thumbs="up"))
    datasets.create(tenant.id, "bot-feedback")
    v1, _ = datasets.add_from_completions(
        tenant.id, "bot-feedback", CompletionFilter("bot"), OPERATOR
    )
    assert v1.example_count == 2

    erasure = erasures.erase(tenant.id, Subject("user", "alice"), OPERATOR)

    assert erasure.lineage["examples"] == 1
    assert erasure.lineage["dataset_versions"] == [{"dataset": "bot-feedback", "version": 1}]
    with pytest.raises(NotFound):
        captures.get(tenant.id, "chatcmpl-1")
    captures.get(tenant.id, "chatcmpl-2")
    v2, new = datasets.add_version(tenant.id, "bot-feedback", VersionChange(), OPERATOR)
    assert new and [e for _, e in datasets.examples(v2)] == [chat("question 2", "b2")]
    # The erased example's content is gone from the version that held it, too.
    assert [e is None for _, e in datasets.examples(v1)] == [True, False]


def test_another_tenants_erasures_and_sources_answer_like_unknown_ones(
    registry: Registry, tenant: Tenant, stores: tuple[JobStore, DatasetStore, ErasureStore]
) -> None:
    jobs, datasets, erasures = stores
    assert tenant.id is not None
    other = registry.create_tenant("globex", OPERATOR)
    assert other.id is not None
    datasets.create(tenant.id, "intents")
    upload, _ = _file_version(jobs, datasets, tenant.id, "intents", chat("hi", "greeting"))
    erasure = erasures.erase(tenant.id, Subject("user", "nobody"), OPERATOR)

    with pytest.raises(NotFound) as foreign:
        erasures.get(other.id, erasure.id)
    with pytest.raises(NotFound) as unknown:
        erasures.get(other.id, "erasure-000000000000000000000000")
    assert str(foreign.value).replace(erasure.id, "X") == str(unknown.value).replace(
        "erasure-000000000000000000000000", "X"
    )
    with pytest.raises(NotFound):
        erasures.erase(other.id, Subject("file", upload), OPERATOR)
    assert jobs.get_file(tenant.id, upload).deleted_at is None  # untouched
    with pytest.raises(NotFound):
        erasures.erase(other.id, Subject("completion", "chatcmpl-1"), OPERATOR)
