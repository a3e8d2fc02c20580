"""Stored chat completions, feedback and capture settings through their REST routes.

The official ``openai`` client (``chat.completions.list/retrieve/update/delete``,
``...messages.list``) and plain HTTP talk to a small FastAPI app (these routes, the
gateway's error handler) through Starlette's TestClient, on SQLite and on PostgreSQL.
Completions are stored with ``CaptureStore.save``, as the gateway's capture writes them.
"""

from __future__ import annotations

import datetime as dt
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
from registry.captures import CaptureStore, NewCompletion
from server.api import completions_routes
from tests.server.api.conftest import client_for

ROOT = Actor("test-root", admin=True)
T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def http(registry: Registry) -> TestClient:
    http = client_for(registry, completions_routes.routes)
    http.app.state.capture_store = CaptureStore(registry, inline_bytes=400)  # type: ignore[attr-defined]
    return http


class TenantClient:
    """A tenant with a key, its openai client and its stored completions."""

    def __init__(self, registry: Registry, http: TestClient, name: str) -> None:
        tenant_id = registry.create_tenant(name, ROOT).id
        assert tenant_id is not None
        self.tenant_id = tenant_id
        _, key = registry.create_api_key(tenant_id, "tenant", ROOT)
        self.headers = {"Authorization": f"Bearer {key}"}
        self.client = OpenAI(
            api_key=key, base_url="http://testserver/v1", http_client=http, max_retries=0
        )
        self.store = CaptureStore(registry, inline_bytes=400)

    def stored(self, number: int, **fields: Any) -> str:
        completion_id = f"chatcmpl-{number}"
        messages = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": f"question {number}"}]},
        ]
        values: dict[str, Any] = {
            "tenant_id": self.tenant_id,
            "completion_id": completion_id,
            "model": "bot",
            "adapter": "bot",
            "version": 2,
            "route": "canary",
            "user": "u1",
            "metadata": {},
            "stream": False,
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "created_at": T0 + dt.timedelta(minutes=number),
            "request": {"model": "bot", "messages": messages, "temperature": 0},
            "response": {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(T0.timestamp()) + 60 * number,
                "model": "bot",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"answer {number}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            },
        }
        assert self.store.save([NewCompletion(**{**values, **fields})]) == []
        return completion_id


@pytest.fixture
def acme(registry: Registry, http: TestClient) -> TenantClient:
    return TenantClient(registry, http, "acme")


@pytest.fixture
def globex(registry: Registry, http: TestClient) -> TenantClient:
    return TenantClient(registry, http, "globex")


@pytest.fixture
def admin(registry: Registry) -> dict[str, str]:
    _, key = registry.create_api_key(None, "admin", ROOT)
    return {"Authorization": f"Bearer {key}"}


def test_the_openai_client_lists_retrieves_updates_and_deletes(acme: TenantClient) -> None:
    first = acme.stored(1, metadata={"topic": "billing"})
    acme.stored(2, metadata={"topic": "refunds"}, model="bot@2")
    acme.stored(3, metadata={"topic": "billing"})
    client = acme.client
    assert [c.id for c in client.chat.completions.list()] == [first, "chatcmpl-2", "chatcmpl-3"]
    billing = client.chat.completions.list(metadata={"topic": "billing"})
    assert [c.id for c in billing] == [first, "chatcmpl-3"]
    assert [c.id for c in client.chat.completions.list(model="bot@2")] == ["chatcmpl-2"]
    newest = client.chat.completions.list(order="desc", limit=1)
    assert ([c.id for c in newest.data], newest.has_more) == (["chatcmpl-3"], True)
    assert [c.id for c in client.chat.completions.list(after=first)] == ["chatcmpl-2", "chatcmpl-3"]
    got = client.chat.completions.retrieve(first)
    assert (got.id, got.model, got.choices[0].message.content) == (first, "bot", "answer 1")
    assert got.usage is not None and got.usage.total_tokens == 5
    assert got.metadata == {"topic": "billing"}
    extra = got.model_extra or {}
    assert extra["loraplex"] == {
        "adapter": "bot", "version": 2, "route": "canary", "user": "u1", "stream": False
    }  # fmt: skip
    assert extra["request"] == {"model": "bot", "temperature": 0}
    updated = client.chat.completions.update(first, metadata={"topic": "sales"})
    assert updated.metadata == {"topic": "sales"}
    assert [c.id for c in client.chat.completions.list(metadata={"topic": "billing"})] == [
        "chatcmpl-3"
    ]
    deleted = client.chat.completions.delete(first)
    assert (deleted.id, deleted.deleted, deleted.object) == (first, True, "chat.completion.deleted")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.retrieve(first)


def test_messages_are_the_requests_with_ids_and_content_parts(acme: TenantClient) -> None:
    completion_id = acme.stored(1)
    messages = acme.client.chat.completions.messages.list(completion_id)
    assert [(m.id, m.role, m.content) for m in messages] == [
        (f"{completion_id}-0", "system", "be brief"),
        (f"{completion_id}-1", "user", "question 1"),
    ]
    assert messages.data[0].content_parts is None
    assert messages.data[1].content_parts is not None
    assert messages.data[1].content_parts[0].text == "question 1"  # type: ignore[union-attr]
    page = acme.client.chat.completions.messages.list(completion_id, limit=1, order="desc")
    assert ([m.id for m in page.data], page.has_more) == ([f"{completion_id}-1"], True)
    rest = acme.client.chat.completions.messages.list(completion_id, after=f"{completion_id}-1")
    assert [m.id for m in rest] == []
    with pytest.raises(openai.BadRequestError, match="not a message id of this completion"):
        acme.client.chat.completions.messages.list(completion_id, after="msg-1")


def test_large_bodies_read_back_from_the_blob_store(acme: TenantClient, registry: Registry) -> None:
    long = "y" * 2000
    completion_id = acme.stored(
        1,
        request={"model": "bot", "messages": [{"role": "user", "content": long}]},
    )
    assert acme.store.get(acme.tenant_id, completion_id).body_blob is not None
    messages = acme.client.chat.completions.messages.list(completion_id)
    assert [m.content for m in messages] == [long]


def test_bad_filters_and_bodies_get_precise_400s(acme: TenantClient, http: TestClient) -> None:
    completion_id = acme.stored(1)
    with pytest.raises(openai.BadRequestError, match="at most 16 are allowed"):
        acme.client.chat.completions.update(
            completion_id, metadata={str(i): "v" for i in range(17)}
        )
    plain = http.get("/v1/chat/completions?metadata=topic", headers=acme.headers)
    assert plain.status_code == 400 and plain.json()["error"]["param"] == "metadata"
    with pytest.raises(openai.NotFoundError, match="'chatcmpl-9' does not exist"):
        acme.client.chat.completions.list(after="chatcmpl-9")


def test_feedback_is_given_listed_and_exported_with_its_completion(
    acme: TenantClient, http: TestClient
) -> None:
    one, two = acme.stored(1), acme.stored(2)
    given = [
        (one, {"thumbs": "up", "rating": 5}),
        (two, {"thumbs": "down", "correction": "answer two, better", "note": "too terse"}),
        (one, {"note": "fine"}),
    ]
    made = []
    for completion_id, body in given:
        reply = http.post(
            f"/v1/chat/completions/{completion_id}/feedback", json=body, headers=acme.headers
        )
        assert reply.status_code == 200, reply.text
        made.append(reply.json())
    assert made[1]["object"] == "chat.completion.feedback"
    assert (made[1]["completion_id"], made[1]["correction"]) == (two, "answer two, better")
    ids = [f["id"] for f in made]
    listed = http.get(f"/v1/chat/completions/{one}/feedback", headers=acme.headers).json()
    assert [f["id"] for f in listed["data"]] == [ids[0], ids[2]]
    assert (listed["first_id"], listed["last_id"], listed["has_more"]) == (ids[0], ids[2], False)
    downs = http.get("/v1/feedback?thumbs=down", headers=acme.headers).json()
    assert [f["id"] for f in downs["data"]] == [ids[1]]
    page = http.get(f"/v1/feedback?limit=1&after={ids[0]}", headers=acme.headers).json()
    assert ([f["id"] for f in page["data"]], page["has_more"]) == ([ids[1]], True)
    export = http.get("/v1/feedback/export", headers=acme.headers)
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("application/jsonl")
    lines = [json.loads(line) for line in export.text.splitlines()]
    assert [line["id"] for line in lines] == ids
    assert lines[1]["completion"]["choices"][0]["message"]["content"] == "answer 2"
    assert lines[1]["completion"]["loraplex"]["version"] == 2
    assert lines[1]["messages"][0] == {"role": "system", "content": "be brief"}
    only = http.get(f"/v1/feedback/export?completion_id={two}", headers=acme.headers)
    assert [json.loads(line)["id"] for line in only.text.splitlines()] == [ids[1]]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({}, "at least one of thumbs, rating, correction or note"),
        ({"rating": 9}, "rating must be an integer from 1 to 5"),
        ({"note": "x" * 4097}, "note is longer than 4096 characters"),
    ],
)
def test_bad_feedback_is_a_400(
    acme: TenantClient, http: TestClient, body: dict[str, Any], problem: str
) -> None:
    completion_id = acme.stored(1)
    reply = http.post(
        f"/v1/chat/completions/{completion_id}/feedback", json=body, headers=acme.headers
    )
    assert reply.status_code == 400 and problem in reply.json()["error"]["message"]
    assert http.get("/v1/feedback", headers=acme.headers).json()["data"] == []


FOREIGN_CALLS: list[tuple[str, str, Any]] = [
    ("GET", "/v1/chat/completions/{}", None),
    ("POST", "/v1/chat/completions/{}", {"metadata": {"k": "v"}}),
    ("DELETE", "/v1/chat/completions/{}", None),
    ("GET", "/v1/chat/completions/{}/messages", None),
    ("POST", "/v1/chat/completions/{}/feedback", {"thumbs": "up"}),
    ("GET", "/v1/chat/completions/{}/feedback", None),
    ("GET", "/v1/chat/completions?after={}", None),
    ("GET", "/v1/feedback?completion_id={}", None),
    ("GET", "/v1/feedback/export?completion_id={}", None),
]


@pytest.mark.parametrize(("method", "path", "body"), FOREIGN_CALLS)
def test_a_foreign_completion_id_is_answered_like_an_unknown_one(
    acme: TenantClient, globex: TenantClient, http: TestClient, method: str, path: str, body: Any
) -> None:
    theirs = acme.stored(7, metadata={"k": "original"})
    http.post(f"/v1/chat/completions/{theirs}/feedback", json={"note": "x"}, headers=acme.headers)
    unknown = "chatcmpl-" + "0" * 9
    foreign = http.request(method, path.format(theirs), json=body, headers=globex.headers)
    never = http.request(method, path.format(unknown), json=body, headers=globex.headers)
    assert foreign.status_code == 404
    assert foreign.text.replace(theirs, unknown) == never.text
    assert acme.store.get(acme.tenant_id, theirs).metadata_ == {"k": "original"}
    assert len(http.get("/v1/feedback", headers=acme.headers).json()["data"]) == 1
    assert http.get("/v1/chat/completions", headers=globex.headers).json()["data"] == []


def test_admins_set_a_tenants_capture_and_tenants_cannot(
    acme: TenantClient, http: TestClient, admin: dict[str, str], registry: Registry
) -> None:
    shown = http.get("/admin/tenants/acme/capture", headers=admin).json()
    assert shown == {
        "object": "tenant.capture", "tenant": "acme", "enabled": False,
        "store_by_default": False, "retention_days": 30, "max_body_bytes": 1 << 20,
    }  # fmt: skip
    body = {"enabled": True, "store_by_default": True, "retention_days": 7}
    put = http.put(f"/admin/tenants/{acme.tenant_id}/capture", json=body, headers=admin)
    assert put.status_code == 200, put.text
    assert put.json()["retention_days"] == 7 and put.json()["max_body_bytes"] == 1 << 20
    assert acme.store.settings(acme.tenant_id).store_by_default
    refused = http.put("/admin/tenants/acme/capture", json={"enabled": False}, headers=acme.headers)
    assert refused.status_code == 403
    bad = http.put("/admin/tenants/acme/capture", json={**body, "retention_days": 0}, headers=admin)
    assert bad.status_code == 400 and "retention_days" in bad.json()["error"]["message"]
    ghost = http.get("/admin/tenants/ghost/capture", headers=admin)
    assert ghost.status_code == 404
    assert acme.store.settings(acme.tenant_id).enabled
    assert [e.action for e in registry.audit_log(action="tenant.capture")] == ["tenant.capture"]
