"""Erasure through its REST routes and the official ``openai`` client's ``files.delete``,
on SQLite and PostgreSQL (a small FastAPI app with these routes and the gateway's error
handler, through Starlette's TestClient)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "registry"))

from registry import Actor, Registry
from registry.datasets import DatasetStore, NewExample, VersionChange
from registry.jobs import JobStore
from server.api import erasure_routes, jobs_routes
from tests.server.api.conftest import client_for

ROOT = Actor("test-root", admin=True)
TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
EXAMPLE = {"messages": TURNS}


@pytest.fixture
def http(registry: Registry) -> TestClient:
    return client_for(registry, jobs_routes.routes, erasure_routes.routes)


def tenant(registry: Registry, http: TestClient, name: str) -> tuple[int, OpenAI, dict[str, str]]:
    tenant_id = registry.create_tenant(name, ROOT).id
    assert tenant_id is not None
    _, key = registry.create_api_key(tenant_id, "tenant", ROOT)
    client = OpenAI(api_key=key, base_url="http://testserver/v1", http_client=http, max_retries=0)
    return tenant_id, client, {"Authorization": f"Bearer {key}"}


def test_deleting_a_file_erases_its_examples_and_says_what_they_reached(
    registry: Registry, http: TestClient
) -> None:
    tenant_id, client, headers = tenant(registry, http, "acme")
    uploaded = client.files.create(
        file=("data.jsonl", json.dumps(EXAMPLE).encode() + b"\n"), purpose="fine-tune"
    )
    datasets = DatasetStore(JobStore(registry))
    datasets.create(tenant_id, "intents")
    change = VersionChange(add=[NewExample(EXAMPLE, "file", uploaded.id)])
    datasets.add_version(tenant_id, "intents", change, ROOT)

    deleted = client.files.delete(uploaded.id)

    assert deleted.deleted and deleted.id == uploaded.id
    erasure: dict[str, Any] = (deleted.model_extra or {})["erasure"]
    assert erasure["lineage"]["dataset_versions"] == [{"dataset": "intents", "version": 1}]
    assert erasure["kind"] == "file" and erasure["subject"] == uploaded.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    assert uploaded.id not in [f.id for f in client.files.list()]
    listed = http.get("/v1/erasures", headers=headers).json()["data"]
    assert [e["id"] for e in listed] == [erasure["id"]]
    shown = http.get(f"/v1/erasures/{erasure['id']}", headers=headers)
    assert shown.status_code == 200 and shown.json() == erasure
    retrained = http.post(f"/v1/erasures/{erasure['id']}/retrain", headers=headers)
    assert retrained.status_code == 200, retrained.text
    assert retrained.json()["data"] == []  # nothing was trained on it yet


def test_an_erasure_names_exactly_one_subject(registry: Registry, http: TestClient) -> None:
    _, _, headers = tenant(registry, http, "acme")
    for body in ({}, {"user": "u1", "file": "file-1"}):
        refused = http.post("/v1/erasures", json=body, headers=headers)
        assert refused.status_code == 400, refused.text
        assert "exactly one of" in refused.json()["error"]["message"]
    assert http.get("/v1/erasures", headers=headers).json()["data"] == []
    long = http.post("/v1/erasures", json={"user": "u" * 257}, headers=headers)
    assert long.status_code == 400 and "1-256 characters" in long.text


def test_another_tenants_file_and_erasure_answer_like_unknown_ones(
    registry: Registry, http: TestClient
) -> None:
    _, owner, owner_headers = tenant(registry, http, "acme")
    _, intruder, headers = tenant(registry, http, "globex")
    uploaded = owner.files.create(
        file=("data.jsonl", json.dumps(EXAMPLE).encode() + b"\n"), purpose="fine-tune"
    )
    erasure = http.post("/v1/erasures", json={"user": "u1"}, headers=owner_headers).json()

    foreign = http.delete(f"/v1/files/{uploaded.id}", headers=headers)
    unknown = http.delete("/v1/files/file-000000000000000000000000", headers=headers)
    assert (foreign.status_code, unknown.status_code) == (404, 404)
    assert foreign.json()["error"]["message"].replace(uploaded.id, "X") == unknown.json()["error"][
        "message"
    ].replace("file-000000000000000000000000", "X")
    assert owner.files.retrieve(uploaded.id).id == uploaded.id  # untouched
    for path in (f"/v1/erasures/{erasure['id']}", f"/v1/erasures/{erasure['id']}/retrain"):
        method = http.get if not path.endswith("retrain") else http.post
        assert method(path, headers=headers).status_code == 404
    assert http.get("/v1/erasures", headers=headers).json()["data"] == []
    with pytest.raises(openai.NotFoundError):
        intruder.files.delete(uploaded.id)
