"""The datasets REST routes on SQLite and on PostgreSQL.

A small FastAPI app (the files and datasets routers, the gateway's error handler) behind
Starlette's TestClient: files are uploaded with the official ``openai`` client, datasets
are driven over plain HTTP, as a client without a dataset SDK would.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "registry"))

from registry import Actor, Registry
from registry.captures import CaptureStore, FeedbackInput, NewCompletion
from registry.datasets import address
from server.api import datasets_routes, jobs_routes
from tests.server.api.conftest import client_for

ROOT = Actor("test-root", admin=True)


def chat(question: str, answer: str = "ok") -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def jsonl(*records: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


A, B, C = chat("a?"), chat("b?"), chat("c?")


@pytest.fixture
def http(registry: Registry) -> TestClient:
    return client_for(registry, jobs_routes.routes, datasets_routes.routes)


class Tenant:
    def __init__(self, registry: Registry, http: TestClient, name: str) -> None:
        tenant_id = registry.create_tenant(name, ROOT).id
        assert tenant_id is not None
        self.tenant_id, self.http = tenant_id, http
        _, key = registry.create_api_key(tenant_id, "tenant", ROOT)
        self.headers = {"Authorization": f"Bearer {key}"}
        self.openai = OpenAI(
            api_key=key, base_url="http://testserver/v1", http_client=http, max_retries=0
        )

    def upload(self, *records: dict[str, Any]) -> str:
        file = io.BytesIO(jsonl(*records))
        return self.openai.files.create(file=("data.jsonl", file), purpose="fine-tune").id

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.http.post(path, json=body, headers=self.headers)

    def get(self, path: str, **params: Any) -> Any:
        return self.http.get(path, params=params, headers=self.headers)

    def version(self, body: dict[str, Any], name: str = "faq") -> Any:
        return self.post(f"/v1/datasets/{name}/versions", body)


@pytest.fixture
def acme(registry: Registry, http: TestClient) -> Tenant:
    tenant = Tenant(registry, http, "acme")
    assert tenant.post("/v1/datasets", {"name": "faq", "description": "Q&A"}).status_code == 201
    return tenant


@pytest.fixture
def globex(registry: Registry, http: TestClient) -> Tenant:
    return Tenant(registry, http, "globex")


def test_datasets_are_created_listed_and_shown(acme: Tenant) -> None:
    shown = acme.get("/v1/datasets/faq").json()
    assert shown["object"] == "dataset" and shown["name"] == "faq"
    assert (shown["description"], shown["latest_version"]) == ("Q&A", None)
    assert isinstance(shown["created_at"], int)
    assert [d["name"] for d in acme.get("/v1/datasets").json()["data"]] == ["faq"]
    again = acme.post("/v1/datasets", {"name": "faq"})
    assert again.status_code == 409 and "already exists" in again.json()["error"]["message"]
    bad = acme.post("/v1/datasets", {"name": "has spaces"})
    assert bad.status_code == 400 and "dataset" in bad.json()["error"]["message"]


def test_versions_from_files_with_diffs_examples_and_audit(acme: Tenant) -> None:
    first = acme.upload(A, B)
    v1 = acme.version({"training_file": first})
    assert v1.status_code == 201, v1.text
    body = v1.json()
    assert (body["number"], body["parent"], body["examples"], body["added"]) == (1, None, 2, 2)
    assert body["method"] == "supervised" and body["source"]["training_file"] == first
    assert body["audit"]["examples"] == 2 and "leakage" in body["audit"]
    assert acme.get(f"/v1/files/{body['file_id']}").json()["line_count"] == 2  # an ordinary file

    same = acme.version({"training_file": first})
    assert same.status_code == 200 and same.json()["number"] == 1

    v2 = acme.version({"training_file": acme.upload(C), "remove": [address(A)]})
    assert v2.status_code == 201
    assert (v2.json()["number"], v2.json()["parent"]) == (2, 1)
    shown = acme.get("/v1/datasets/faq/versions/2").json()
    assert shown["diff"] == {"added": [address(C)], "removed": [address(A)]}
    assert acme.get("/v1/datasets/faq").json()["latest_version"] == 2
    listed = acme.get("/v1/datasets/faq/versions").json()
    assert [v["number"] for v in listed["data"]] == [1, 2]

    page = acme.get("/v1/datasets/faq/versions/2/examples", limit=1).json()
    assert page["data"] == [{"id": address(B), "object": "dataset.example", "example": B}]
    assert page["has_more"] is True
    rest = acme.get("/v1/datasets/faq/versions/2/examples", after=page["last_id"]).json()
    assert [e["id"] for e in rest["data"]] == [address(C)] and rest["has_more"] is False


def test_replace_starts_from_nothing(acme: Tenant) -> None:
    acme.version({"training_file": acme.upload(A, B)})
    replaced = acme.version({"training_file": acme.upload(C), "replace": True}).json()
    assert (replaced["examples"], replaced["added"], replaced["removed"]) == (1, 1, 2)


def test_bad_input_is_a_precise_400_and_writes_nothing(acme: Tenant) -> None:
    acme.version({"training_file": acme.upload(A)})
    pairs = acme.upload({"prompt": "p", "chosen": "c", "rejected": "r"})
    cases: list[tuple[dict[str, Any], str | None, str]] = [
        ({"training_file": pairs}, "invalid_training_file", "a preference record"),
        ({"remove": ["nothex"]}, None, "is not an example address"),
        ({"remove": [address(C)]}, "invalid_request", "not in the latest version"),
        ({}, None, "nothing to change"),
        ({"training_file": pairs, "from_completions": {}}, None, "one source per version"),
        ({"from_completions": {}, "replace": True}, None, "from_completions adds"),
        ({"training_file": pairs, "method": "dpo"}, "invalid_request", "holds supervised"),
    ]
    for body, code, message in cases:
        answer = acme.version(body)
        assert answer.status_code == 400, (body, answer.text)
        error = answer.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", code), body
        assert message in error["message"], (body, error)
    assert [v["number"] for v in acme.get("/v1/datasets/faq/versions").json()["data"]] == [1]
    bad_cursor = acme.get("/v1/datasets/faq/versions/1/examples", after="x" * 64)
    assert bad_cursor.status_code == 400 and bad_cursor.json()["error"]["param"] == "after"


def test_a_foreign_dataset_answers_exactly_like_an_unknown_one(
    acme: Tenant, globex: Tenant
) -> None:
    acme.version({"training_file": acme.upload(A)})
    theirs = globex.upload(B)
    for path, body in (
        ("/v1/datasets/{}", None),
        ("/v1/datasets/{}/versions", None),
        ("/v1/datasets/{}/versions/1", None),
        ("/v1/datasets/{}/versions/1/examples", None),
        ("/v1/datasets/{}/versions", {"training_file": theirs}),
    ):
        answers = []
        for name in ("faq", "nope"):
            url = path.format(name)
            reply = globex.get(url) if body is None else globex.post(url, body)
            answers.append((reply.status_code, reply.text.replace(name, "NAME")))
        assert answers[0] == answers[1] and answers[0][0] == 404, (path, answers)
    # acme's file is as foreign to globex's dataset as an unknown file
    globex.post("/v1/datasets", {"name": "mine"})
    foreign = globex.version({"training_file": acme.upload(C)}, name="mine")
    unknown = globex.version({"training_file": "file-0000"}, name="mine")
    assert foreign.status_code == unknown.status_code == 404


def test_a_version_from_liked_stored_completions(registry: Registry, acme: Tenant) -> None:
    captures = CaptureStore(registry)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    answer = {"role": "assistant", "content": "4"}
    record = NewCompletion(
        acme.tenant_id, "chatcmpl-1", "bot", "bot", 1, "production", "u-1", {}, False, 3, 1,
        dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
        {"model": "bot", "messages": messages},
        {"id": "chatcmpl-1", "object": "chat.completion", "model": "bot",
         "choices": [{"index": 0, "message": answer, "finish_reason": "stop"}]},
    )  # fmt: skip
    assert captures.save([record]) == []
    captures.add_feedback(acme.tenant_id, "chatcmpl-1", FeedbackInput("up", None, None, None))
    made = acme.version({"from_completions": {"adapter": "bot"}})
    assert made.status_code == 201, made.text
    assert made.json()["examples"] == 1 and made.json()["audit"]["examples"] == 1
    examples = acme.get("/v1/datasets/faq/versions/1/examples").json()["data"]
    assert examples[0]["example"] == {"messages": [*messages, answer]}
    again = acme.version({"from_completions": {"adapter": "bot"}})
    assert again.status_code == 200
