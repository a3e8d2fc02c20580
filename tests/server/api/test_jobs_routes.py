"""The files and fine-tuning jobs API through the official ``openai`` client.

The client talks to a small FastAPI app (the jobs router, the gateway's error handler)
through Starlette's TestClient, on SQLite and on PostgreSQL (the registry fixtures of
tests/training); a worker runs in-process.
"""

from __future__ import annotations

import datetime as dt
import io
import threading
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai import OpenAI

from registry import Actor, BaseModelRecord, Registry
from registry.jobs import JobStore
from registry.models import utcnow
from registry.workers import GONE_AFTER, WorkerRoster
from server.api import jobs_routes
from server.errors import install_api_error_handler
from tests.training import conftest as training_fixtures
from tests.training.training_testdata import (
    FAST,
    fixed_answer_records,
    jsonl,
    preference_records,
)
from training.recipe import KEEP_CHECKPOINTS
from training.worker import Worker, WorkerOptions

ROOT = Actor("test-root", admin=True)

# The training tests' fixtures: a tiny chat base, registries on SQLite and PostgreSQL.
chat_base = training_fixtures.chat_base
pg_url = training_fixtures.pg_url
database_url = training_fixtures.database_url
registry = training_fixtures.registry
base = training_fixtures.base


@pytest.fixture
def http(registry: Registry) -> TestClient:
    app = FastAPI()
    install_api_error_handler(app)
    app.state.registry = registry
    app.state.max_training_file_bytes = 50_000
    app.include_router(jobs_routes.routes)
    return TestClient(app)


def _client(registry: Registry, http: TestClient, tenant: str) -> OpenAI:
    tenant_id = registry.create_tenant(tenant, ROOT).id
    _, key = registry.create_api_key(tenant_id, "tenant", ROOT)
    return OpenAI(api_key=key, base_url="http://testserver/v1", http_client=http, max_retries=0)


@pytest.fixture
def acme(registry: Registry, http: TestClient, base: BaseModelRecord) -> OpenAI:
    return _client(registry, http, "acme")


@pytest.fixture
def globex(registry: Registry, http: TestClient, base: BaseModelRecord) -> OpenAI:
    return _client(registry, http, "globex")


def _upload(client: OpenAI, content: bytes, name: str = "train.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(content)), purpose="fine-tune").id


def test_a_job_runs_from_upload_to_a_usable_model(
    acme: OpenAI, registry: Registry, base: BaseModelRecord, chat_base: Path, tmp_path: Path
) -> None:
    file_id = _upload(acme, jsonl(fixed_answer_records(60)))
    assert [f.id for f in acme.files.list()] == [file_id]
    job = acme.fine_tuning.jobs.create(
        model="tiny-chat",
        training_file=file_id,
        suffix="banana-bot",
        seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
        extra_body={"servable_checkpoints": True},
    )
    assert (job.status, job.model, job.seed, job.fine_tuned_model) == (
        "queued", "tiny-chat", 3, None
    )  # fmt: skip
    assert job.hyperparameters.n_epochs == 2 and job.trained_tokens is None  # not trained yet
    store = JobStore(registry)
    options = WorkerOptions(chat_base, base.fingerprint, tmp_path / "work", FAST, 0.1, 0.5)
    assert Worker(store, options).run_once() is not None
    done = acme.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "banana-bot"
    assert done.finished_at is not None and done.finished_at >= done.created_at
    assert done.model_extra is not None
    train = done.model_extra["result"]["train"]
    assert done.trained_tokens is not None and done.trained_tokens == train["trained_tokens"] > 0
    if not train["stopped_early"]:  # every epoch saw each example once: epochs x their tokens
        assert done.trained_tokens % 2 == 0
    tenant_id = registry.get_tenant("acme").id
    assert tenant_id is not None
    assert registry.aliases(tenant_id, "banana-bot")["production"].version == 1
    events = acme.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message == "Job succeeded"
    assert any(e.type == "metrics" for e in events)
    checkpoints = acme.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].fine_tuning_job_id == job.id
    _assert_servable_checkpoints(registry, tenant_id, checkpoints)
    assert [j.id for j in acme.fine_tuning.jobs.list()] == [job.id]
    # A served checkpoint is a model a job can continue (OpenAI's fine-tuning a checkpoint).
    oldest = checkpoints[KEEP_CHECKPOINTS - 1].fine_tuned_model_checkpoint
    again = acme.fine_tuning.jobs.create(model=oldest, training_file=file_id)
    assert again.model_extra is not None and again.model_extra["init_version"] == {
        "adapter": "banana-bot", "version": int(oldest.partition("@")[2])
    }  # fmt: skip


def _assert_servable_checkpoints(registry: Registry, tenant_id: int, checkpoints: Any) -> None:
    """The last three checkpoints name registered versions of the adapter (``banana-bot@N``,
    a name the gateway serves), after the result's and never promoted; older ones name
    nothing served."""
    kept, older = checkpoints[:KEEP_CHECKPOINTS], checkpoints[KEEP_CHECKPOINTS:]
    assert len(kept) == KEEP_CHECKPOINTS
    numbers = []
    for checkpoint in kept:
        name, _, number = checkpoint.fine_tuned_model_checkpoint.partition("@")
        assert (name, registry.get_version(tenant_id, name, int(number)).number) == (
            "banana-bot", int(number)
        )  # fmt: skip
        numbers.append(int(number))
    # The result is version 1 (production); a checkpoint with its weights is version 1 too.
    assert sorted(set(numbers) - {1}) == list(range(2, 2 + len(set(numbers) - {1})))
    assert registry.aliases(tenant_id, "banana-bot")["production"].version == 1
    for checkpoint in older:
        assert checkpoint.fine_tuned_model_checkpoint == f"banana-bot:step-{checkpoint.step_number}"


def test_by_default_a_job_registers_one_version_and_checkpoints_are_metrics(
    acme: OpenAI, registry: Registry, base: BaseModelRecord, chat_base: Path, tmp_path: Path
) -> None:
    file_id = _upload(acme, jsonl(fixed_answer_records(30)))
    job = acme.fine_tuning.jobs.create(model="tiny-chat", training_file=file_id, suffix="one")
    options = WorkerOptions(chat_base, base.fingerprint, tmp_path / "work", FAST, 0.1, 0.5)
    assert Worker(JobStore(registry), options).run_once() is not None
    assert (job.model_extra or {})["servable_checkpoints"] is False
    tenant_id = registry.get_tenant("acme").id
    assert tenant_id is not None
    assert [v.number for v in registry.list_versions(tenant_id, "one")] == [1]
    checkpoints = acme.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints
    for checkpoint in checkpoints:
        assert checkpoint.fine_tuned_model_checkpoint == f"one:step-{checkpoint.step_number}"


def test_without_a_suffix_the_model_is_named_after_the_base(acme: OpenAI) -> None:
    job = acme.fine_tuning.jobs.create(
        model="tiny-chat", training_file=_upload(acme, jsonl(fixed_answer_records(5)))
    )
    assert job.model_extra is not None
    assert job.model_extra["adapter_name"] == f"tiny-chat-ft-{job.id[-8:]}"


def test_a_job_for_a_base_no_worker_trains_says_it_waits_for_one(
    acme: OpenAI, registry: Registry, base: BaseModelRecord
) -> None:
    file_id = _upload(acme, jsonl(fixed_answer_records(5)))
    alone = acme.fine_tuning.jobs.create(model="tiny-chat", training_file=file_id)
    events = acme.fine_tuning.jobs.list_events(alone.id).data
    assert alone.status == "queued" and events[0].level == "warn"
    assert "No fine-tuning worker is running for base 'tiny-chat'" in events[0].message
    assert "loraplex worker" in events[0].message  # what to do about it

    roster = WorkerRoster(registry)
    roster.seen("worker-of-another-base", "0" * 64, force=True)
    assert (
        acme.fine_tuning.jobs.list_events(
            acme.fine_tuning.jobs.create(model="tiny-chat", training_file=file_id).id
        )
        .data[0]
        .level
        == "warn"
    )  # a worker of another base does not count
    roster.seen("worker-1", base.fingerprint, force=True)
    served = acme.fine_tuning.jobs.create(model="tiny-chat", training_file=file_id)
    assert all(e.level == "info" for e in acme.fine_tuning.jobs.list_events(served.id).data)
    roster.gone("worker-1")
    assert roster.serving(base.fingerprint) == []
    long_ago = utcnow() + dt.timedelta(seconds=GONE_AFTER + 1)
    roster.seen("worker-2", base.fingerprint, force=True)
    assert roster.serving(base.fingerprint, now=long_ago) == []  # silent too long: gone


def test_a_worker_is_present_while_it_runs_and_gone_once_stopped(
    registry: Registry, chat_base: Path, tmp_path: Path
) -> None:
    other = "0" * 64  # a base with no queued jobs: the worker only polls
    options = WorkerOptions(chat_base, other, tmp_path / "work", FAST, 0.1, 0.5)
    worker = Worker(JobStore(registry), options, "w-present")
    assert worker.run_once() is None
    roster = WorkerRoster(registry)
    assert roster.serving(other) == ["w-present"]
    stop = threading.Event()
    stop.set()
    worker.run(stop)  # stops at once, and says so
    assert roster.serving(other) == []


def test_malformed_files_are_refused_at_upload_with_line_numbers(acme: OpenAI) -> None:
    content = jsonl(fixed_answer_records(2)) + b'{"prompt": "x"\n'
    with pytest.raises(openai.BadRequestError) as refused:
        _upload(acme, content)
    assert "line 3: invalid JSON" in str(refused.value)
    with pytest.raises(openai.BadRequestError, match="purpose 'assistants' is not supported"):
        acme.files.create(file=("a.jsonl", io.BytesIO(b"{}")), purpose="assistants")


def test_oversized_files_are_refused(acme: OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as refused:
        _upload(acme, jsonl(fixed_answer_records(1000)))
    assert refused.value.status_code == 413
    assert "50000-byte limit" in str(refused.value)


def test_a_preference_file_is_refused_for_a_supervised_job(acme: OpenAI) -> None:
    file_id = _upload(acme, jsonl(preference_records(3)))
    with pytest.raises(openai.BadRequestError) as refused:
        acme.fine_tuning.jobs.create(model="tiny-chat", training_file=file_id)
    assert "line 1: a preference record in a supervised job" in str(refused.value)
    dpo = acme.fine_tuning.jobs.create(
        model="tiny-chat",
        training_file=file_id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
    )
    assert dpo.method is not None and dpo.method.type == "dpo"


def test_bad_options_are_refused_precisely(acme: OpenAI) -> None:
    file_id = _upload(acme, jsonl(fixed_answer_records(5)))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"hyperparameters": {"n_epochs": 0}}, "epochs must be at least 1"),
        ({"hyperparameters": {"rank": 4}}, "unknown hyperparameter 'rank'"),
        ({"suffix": "has space"}, "suffix 'has space' must be"),
        ({"suffix": "LX-bot"}, "suffix 'LX-bot' must be"),  # the LoRA namespace, in any case
        ({"extra_body": {"json_schema": {"type": 12}}}, "json_schema is not a valid JSON schema"),
    ]
    for options, message in cases:
        with pytest.raises(openai.BadRequestError, match=message):
            acme.fine_tuning.jobs.create(model="tiny-chat", training_file=file_id, **options)
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4o` does not exist"):
        acme.fine_tuning.jobs.create(model="gpt-4o", training_file=file_id)


def test_foreign_ids_look_exactly_like_unknown_ones(acme: OpenAI, globex: OpenAI) -> None:
    file_id = _upload(acme, jsonl(fixed_answer_records(5)))
    job = acme.fine_tuning.jobs.create(model="tiny-chat", training_file=file_id)
    unknown = "ftjob-000000000000000000000000"
    calls = [
        lambda j: globex.fine_tuning.jobs.retrieve(j),
        lambda j: globex.fine_tuning.jobs.cancel(j),
        lambda j: globex.fine_tuning.jobs.pause(j),
        lambda j: globex.fine_tuning.jobs.resume(j),
        lambda j: globex.fine_tuning.jobs.list_events(j),
        lambda j: globex.fine_tuning.jobs.checkpoints.list(j),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as foreign:
            call(job.id)
        with pytest.raises(openai.NotFoundError) as missing:
            call(unknown)
        assert str(foreign.value).replace(job.id, "ID") == str(missing.value).replace(unknown, "ID")
    with pytest.raises(openai.NotFoundError):
        globex.fine_tuning.jobs.create(model="tiny-chat", training_file=file_id)
    assert list(globex.fine_tuning.jobs.list()) == []
    assert list(globex.files.list()) == []


def test_cancel_then_cancel_again(acme: OpenAI) -> None:
    job = acme.fine_tuning.jobs.create(
        model="tiny-chat", training_file=_upload(acme, jsonl(fixed_answer_records(5)))
    )
    assert acme.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="already finished"):
        acme.fine_tuning.jobs.cancel(job.id)
    assert acme.fine_tuning.jobs.list_events(job.id).data[0].message == "Job cancelled"


def test_a_paused_job_is_not_claimed_and_resumed_it_trains_from_the_start(
    acme: OpenAI, registry: Registry, base: BaseModelRecord, chat_base: Path, tmp_path: Path
) -> None:
    file_id = _upload(acme, jsonl(fixed_answer_records(20)))
    job = acme.fine_tuning.jobs.create(model="tiny-chat", training_file=file_id, suffix="p-bot")
    with pytest.raises(openai.BadRequestError, match="only paused jobs can be resumed"):
        acme.fine_tuning.jobs.resume(job.id)
    assert acme.fine_tuning.jobs.pause(job.id).status == "paused"
    with pytest.raises(openai.BadRequestError, match="only queued or running jobs can be paused"):
        acme.fine_tuning.jobs.pause(job.id)
    options = WorkerOptions(chat_base, base.fingerprint, tmp_path / "work", FAST, 0.1, 0.5)
    worker = Worker(JobStore(registry), options)
    assert worker.run_once() is None  # paused: left in place
    assert acme.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert acme.fine_tuning.jobs.resume(job.id).status == "queued"
    assert worker.run_once() is not None
    done = acme.fine_tuning.jobs.retrieve(job.id)
    assert (done.status, done.fine_tuned_model) == ("succeeded", "p-bot"), done.error
    messages = [e.message for e in acme.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert "Job resumed: re-queued; training restarts from the start" in "\n".join(messages)
    assert any(m.startswith("Job paused (queued): resuming re-queues it") for m in messages)
    with pytest.raises(openai.BadRequestError, match="succeeded; only queued or running"):
        acme.fine_tuning.jobs.pause(job.id)


def test_a_paused_job_can_be_cancelled(acme: OpenAI) -> None:
    job = acme.fine_tuning.jobs.create(
        model="tiny-chat", training_file=_upload(acme, jsonl(fixed_answer_records(5)))
    )
    acme.fine_tuning.jobs.pause(job.id)
    assert acme.fine_tuning.jobs.cancel(job.id).status == "cancelled"


def test_missing_or_bad_keys_are_refused(http: TestClient, base: BaseModelRecord) -> None:
    client = OpenAI(api_key="nope", base_url="http://testserver/v1", http_client=http)
    with pytest.raises(openai.AuthenticationError):
        client.fine_tuning.jobs.list()
    for headers in ({}, {"Authorization": "Token nope"}, {"Authorization": "Bearer "}):
        answer = http.get("/v1/fine_tuning/jobs", headers=headers)
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "invalid_api_key"
        assert answer.json()["error"]["message"].startswith("Missing or malformed API key")


def test_a_files_content_is_its_own_tenants_only(
    acme: OpenAI, globex: OpenAI, registry: Registry
) -> None:
    content = jsonl(fixed_answer_records(3))
    file_id = _upload(acme, content)
    assert acme.files.content(file_id).read() == content
    with pytest.raises(openai.NotFoundError) as foreign:
        globex.files.content(file_id)
    with pytest.raises(openai.NotFoundError) as unknown:
        globex.files.content("file-nothing")
    assert str(foreign.value).replace(file_id, "X") == str(unknown.value).replace(
        "file-nothing", "X"
    )
    tenant_id = registry.get_tenant("acme").id
    assert tenant_id is not None
    JobStore(registry).delete_file(tenant_id, file_id)
    with pytest.raises(openai.NotFoundError):
        acme.files.content(file_id)
