"""Fine-tuning a fine-tuned model and retraining policies, over HTTP.

The jobs and policies routers on a small FastAPI app (the gateway's error handler), on
SQLite and on PostgreSQL (the training tests' registry fixtures): jobs whose ``model`` is
one of the tenant's adapters (through the official ``openai`` client), and the policy
routes, with a foreign tenant answered exactly like an unknown name.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai import OpenAI

from registry import Actor, BaseModelRecord, Registry
from registry.datasets import DatasetStore, NewExample, VersionChange
from registry.jobs import JobStore
from server.api import jobs_routes, retraining_routes
from server.errors import install_api_error_handler
from tests.registry.registry_testdata import build_adapter
from tests.training import conftest as training_fixtures
from tests.training.training_testdata import fixed_answer_records, jsonl

ROOT = Actor("test-root", admin=True)

chat_base = training_fixtures.chat_base
pg_url = training_fixtures.pg_url
database_url = training_fixtures.database_url
registry = training_fixtures.registry
base = training_fixtures.base


@pytest.fixture(scope="module")
def adapter_dir(chat_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_adapter(chat_base, tmp_path_factory.mktemp("adapter") / "bot", seed=1, r=4)


@pytest.fixture
def http(registry: Registry) -> TestClient:
    app = FastAPI()
    install_api_error_handler(app)
    app.state.registry = registry
    app.include_router(jobs_routes.routes)
    app.include_router(retraining_routes.routes)
    return TestClient(app)


def _key(registry: Registry, tenant: str) -> tuple[int, str]:
    tenant_id = registry.create_tenant(tenant, ROOT).id
    assert tenant_id is not None
    return tenant_id, registry.create_api_key(tenant_id, "tenant", ROOT)[1]


@pytest.fixture
def acme(registry: Registry, base: BaseModelRecord, adapter_dir: Path) -> tuple[int, str]:
    """Tenant acme with adapter bot (v1, in production) and dataset support (v1)."""
    tenant_id, key = _key(registry, "acme")
    registry.push_adapter(tenant_id, "bot", adapter_dir, base.name, ROOT)
    registry.promote(tenant_id, "bot", 1, ROOT)
    jobs = JobStore(registry)
    datasets = DatasetStore(jobs)
    datasets.create(tenant_id, "support")
    records = fixed_answer_records(8)
    change = VersionChange(add=[NewExample(r, "file", "seed") for r in records])
    datasets.add_version(tenant_id, "support", change, ROOT)
    return tenant_id, key


@pytest.fixture
def globex_key(registry: Registry, base: BaseModelRecord) -> str:
    return _key(registry, "globex")[1]


def _client(http: TestClient, key: str) -> OpenAI:
    return OpenAI(api_key=key, base_url="http://testserver/v1", http_client=http, max_retries=0)


def _upload(client: OpenAI) -> str:
    content = jsonl(fixed_answer_records(8))
    return client.files.create(file=("t.jsonl", io.BytesIO(content)), purpose="fine-tune").id


def _extra(job: Any) -> dict[str, Any]:
    assert job.model_extra is not None
    return dict(job.model_extra)


@pytest.mark.parametrize(
    ("model", "number"), [("bot", 1), ("bot@1", 1), ("bot:1", 1), ("bot:production", 1)]
)
def test_a_job_on_an_adapter_continues_it_into_the_same_adapter(
    http: TestClient, acme: tuple[int, str], model: str, number: int
) -> None:
    client = _client(http, acme[1])
    job = client.fine_tuning.jobs.create(model=model, training_file=_upload(client))
    extra = _extra(job)
    assert extra["adapter_name"] == "bot" and job.model == model
    assert extra["init_version"] == {"adapter": "bot", "version": number}
    assert extra["dataset_version"] is None


def test_a_suffix_trains_the_continued_weights_into_a_new_adapter(
    http: TestClient, acme: tuple[int, str]
) -> None:
    client = _client(http, acme[1])
    job = client.fine_tuning.jobs.create(model="bot", training_file=_upload(client), suffix="bot2")
    assert _extra(job)["adapter_name"] == "bot2"
    assert _extra(job)["init_version"] == {"adapter": "bot", "version": 1}


def test_a_job_on_a_dataset_versions_file_records_the_version(
    http: TestClient, acme: tuple[int, str], registry: Registry
) -> None:
    version = DatasetStore(JobStore(registry)).get_version(acme[0], "support")
    client = _client(http, acme[1])
    job = client.fine_tuning.jobs.create(model="tiny-chat", training_file=version.file_id)
    assert _extra(job)["dataset_version"] == {"dataset": "support", "version": 1}
    assert _extra(job)["init_version"] is None
    assert _extra(client.fine_tuning.jobs.retrieve(job.id))["dataset_version"]["version"] == 1


def test_a_foreign_or_unknown_adapter_or_version_is_the_same_404(
    http: TestClient, acme: tuple[int, str], globex_key: str
) -> None:
    globex = _client(http, globex_key)
    file_id = _upload(globex)
    bodies = []
    for model in ("bot", "nope", "bot@1", "nope@1"):
        with pytest.raises(openai.NotFoundError) as refused:
            globex.fine_tuning.jobs.create(model=model, training_file=file_id)
        bodies.append(json.dumps(refused.value.body).replace(model, "M"))
    with pytest.raises(openai.NotFoundError) as missing:
        acme_client = _client(http, acme[1])
        acme_client.fine_tuning.jobs.create(model="bot@7", training_file=_upload(acme_client))
    bodies.append(json.dumps(missing.value.body).replace("bot@7", "M"))
    assert len(set(bodies)) == 1 and '"code": "model_not_found"' in bodies[0]


def _policy(http: TestClient, key: str, adapter: str, body: dict[str, Any]) -> Any:
    auth = {"authorization": f"Bearer {key}"}
    return http.put(f"/v1/fine_tuning/policies/{adapter}", json=body, headers=auth)


def test_a_policy_is_set_shown_run_and_deleted(http: TestClient, acme: tuple[int, str]) -> None:
    auth = {"authorization": f"Bearer {acme[1]}"}
    body = {"dataset": "support", "every_seconds": 3600, "hyperparameters": {"n_epochs": 1}}
    put = _policy(http, acme[1], "bot", body)
    assert put.status_code == 200, put.text
    shown = http.get("/v1/fine_tuning/policies/bot", headers=auth).json()
    assert (shown["object"], shown["dataset"], shown["start_from"]) == (
        "fine_tuning.policy", "support", "production"
    )  # fmt: skip
    assert shown["last_job"] is None and shown["next_run_at"] is not None
    run = http.post("/v1/fine_tuning/policies/bot/run", headers=auth).json()
    assert run["queued"], run["message"]
    assert run["job"]["init_version"] == {"adapter": "bot", "version": 1}
    assert run["job"]["dataset_version"] == {"dataset": "support", "version": 1}
    again = http.post("/v1/fine_tuning/policies/bot/run", headers=auth).json()
    assert not again["queued"] and "unchanged" in again["message"]
    shown = http.get("/v1/fine_tuning/policies", headers=auth).json()["data"][0]
    assert shown["last_job"] == run["job"]["id"] and shown["last_outcome"] == again["message"]
    assert http.delete("/v1/fine_tuning/policies/bot", headers=auth).json()["deleted"] is True
    assert http.get("/v1/fine_tuning/policies/bot", headers=auth).status_code == 404


def test_a_foreign_adapters_policy_is_answered_like_an_unknown_one(
    http: TestClient, acme: tuple[int, str], globex_key: str
) -> None:
    assert _policy(http, acme[1], "bot", {"dataset": "support", "every_seconds": 60}).is_success
    auth = {"authorization": f"Bearer {globex_key}"}
    answers = []
    for adapter in ("bot", "nope"):
        for response in (
            http.get(f"/v1/fine_tuning/policies/{adapter}", headers=auth),
            http.delete(f"/v1/fine_tuning/policies/{adapter}", headers=auth),
            http.post(f"/v1/fine_tuning/policies/{adapter}/run", headers=auth),
            _policy(http, globex_key, adapter, {"dataset": "support", "every_seconds": 60}),
        ):
            assert response.status_code == 404
            answers.append(response.text.replace(adapter, "X"))
    assert answers[:4] == answers[4:]
    assert set(json.loads(answers[0])["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"dataset": "support"}, "needs a trigger"),
        ({"dataset": "support", "every_seconds": 60, "suffix": "x"}, "suffix"),
        ({"dataset": "support", "every_seconds": 60, "hyperparameters": {"rr": 1}}, "'rr'"),
        ({"dataset": "support", "every_seconds": 60, "start_from": "x"}, "start_from"),
        ({"dataset": "support", "every_seconds": 10**12}, "every_seconds must be from 1 to"),
        ({"dataset": "sup\u0000port", "every_seconds": 60}, "does not exist"),
    ],
)
def test_a_bad_policy_is_refused_with_what_to_change(
    http: TestClient, acme: tuple[int, str], body: dict[str, Any], needle: str
) -> None:
    refused = _policy(http, acme[1], "bot", body)
    # 422: pydantic's refusal, which the gateway's own handler answers as an OpenAI 400.
    expected = (404,) if needle == "does not exist" else (400, 422)
    assert refused.status_code in expected, refused.text
    assert needle in refused.text
