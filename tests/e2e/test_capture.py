"""Capture and feedback end to end: the real vLLM engine, through the official openai client.

Each test runs twice: on the session's gateway (SQLite, local blobs) and on a second gateway
with a PostgreSQL registry of its own in front of the same engine. That engine finds
adapters in the session's registry, so an adapter the PostgreSQL gateway serves is pushed
to both registries (the same bytes: the same LoRA name in each).

A tenant's capture is set through the admin REST route. Stored completions are written
after their answers, so tests wait for the one they stored last: the gateway writes its
queue in order, so by then everything asked before it has been written, or never will be.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from registry import ADMIN_SCOPE, Registry
from registry.captures import CaptureStore, CompletionQuery
from tests.e2e.conftest import OPERATOR, TenantKeys, make_tenant
from tests.e2e.probes import postgres_gateway
from tests.e2e.serving import ServeProcess, metric_samples
from tests.registry.registry_testdata import build_adapter

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}]
ADAPTER = "helper"
STORED_WITHIN = 30.0
"""Seconds a stored completion may take to be listed before a test gives up on it."""


@dataclass
class Site:
    """One gateway with its registry, and this module's tenants on it."""

    url: str
    registry: Registry
    admin_key: str
    base_name: str
    tenants: dict[str, TenantKeys]

    def client(self, tenant: str) -> OpenAI:
        key = self.tenants[tenant].key
        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def http(self, tenant: str) -> httpx.Client:
        auth = {"authorization": f"Bearer {self.tenants[tenant].key}"}
        return httpx.Client(base_url=self.url, headers=auth, timeout=60)

    def set_capture(self, tenant: str, **settings: Any) -> None:
        reply = httpx.put(
            f"{self.url}/admin/tenants/{tenant}/capture",
            json=settings,
            headers={"authorization": f"Bearer {self.admin_key}"},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text


@pytest.fixture(scope="module")
def adapter_dir(demo_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_adapter(demo_base, tmp_path_factory.mktemp("capture") / ADAPTER, seed=17, r=8)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def site(
    request: pytest.FixtureRequest,
    gateway: ServeProcess,
    registry: Registry,
    demo_base: Path,
    adapter_dir: Path,
    engine_port: int,
    engine_key: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Site]:
    if request.param == "sqlite":
        yield _populated(gateway.url, registry, registry, demo_base, adapter_dir)
        return
    home = tmp_path_factory.mktemp("capture-pg")
    with postgres_gateway("loraplex_capture_e2e", home, engine_port, engine_key, demo_base) as (
        serve,
        own,
    ):
        yield _populated(serve.url, own, registry, demo_base, adapter_dir)


def _populated(
    url: str, own: Registry, engines: Registry, demo_base: Path, adapter_dir: Path
) -> Site:
    """The site's tenants: ``on`` (capture on, an adapter), ``other`` (capture on),
    ``off`` (capture never turned on) and ``small`` (capture on, 300-byte bodies)."""
    run = uuid.uuid4().hex[:6]  # the session registry is shared with other modules' tenants
    tenants = {role: make_tenant(own, f"capture-{role}-{run}") for role in ("on", "other", "off")}
    tenants["small"] = make_tenant(own, f"capture-small-{run}")
    version = own.push_adapter(
        tenants["on"].tenant_id, ADAPTER, adapter_dir, demo_base.name, OPERATOR
    )
    own.promote(tenants["on"].tenant_id, ADAPTER, version.number, OPERATOR)
    if engines is not own:
        holder = make_tenant(engines, f"capture-engine-side-{run}")
        engines.push_adapter(holder.tenant_id, ADAPTER, adapter_dir, demo_base.name, OPERATOR)
    _, admin_key = own.create_api_key(None, ADMIN_SCOPE, OPERATOR)
    site = Site(url, own, admin_key, demo_base.name, tenants)
    for role in ("on", "other"):
        site.set_capture(tenants[role].name, enabled=True)
    site.set_capture(tenants["small"].name, enabled=True, max_body_bytes=300)
    return site


def _wait_stored(client: OpenAI, *completion_ids: str) -> None:
    """Until every one is stored: captures are written after their answers, in the order
    their answers ended, and a stream's may end after the next request's has."""
    deadline = time.monotonic() + STORED_WITHIN
    while missing := set(completion_ids) - {c.id for c in client.chat.completions.list(limit=100)}:
        assert time.monotonic() < deadline, f"{sorted(missing)} were not stored"
        time.sleep(0.2)


def _chat(client: OpenAI, model: str, **options: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=8, temperature=0, **options
    )


def test_stored_completions_are_listed_filtered_retrieved_updated_and_deleted(site: Site) -> None:
    client = site.client("on")
    plain = _chat(client, ADAPTER, store=True, metadata={"topic": "billing"}, user="u-7")
    _chat(client, ADAPTER, store=False)
    _chat(client, site.base_name)  # OpenAI's default: not stored
    chunks = list(_chat(client, site.base_name, store=True, stream=True, metadata={"topic": "x"}))
    streamed_id, streamed_text = (
        chunks[0].id,
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
    )
    last = _chat(client, site.base_name, store=True)
    _wait_stored(client, plain.id, streamed_id, last.id)

    assert [c.id for c in client.chat.completions.list()] == [plain.id, streamed_id, last.id]
    assert [c.id for c in client.chat.completions.list(metadata={"topic": "billing"})] == [plain.id]
    assert [c.id for c in client.chat.completions.list(model=ADAPTER)] == [plain.id]
    assert [c.id for c in client.chat.completions.list(model=site.base_name, order="desc")] == [
        last.id,
        streamed_id,
    ]
    got = client.chat.completions.retrieve(plain.id)
    assert got.choices[0].message.content == plain.choices[0].message.content
    assert (got.model, got.metadata) == (ADAPTER, {"topic": "billing"})
    served = (got.model_extra or {})["loraplex"]
    assert served == {"adapter": ADAPTER, "version": 1, "route": "production", "user": "u-7",
                      "stream": False}  # fmt: skip
    assert got.usage is not None and got.usage == plain.usage
    again = client.chat.completions.retrieve(streamed_id)
    assert again.choices[0].message.content == streamed_text
    assert (again.model_extra or {})["loraplex"]["stream"] is True
    messages = client.chat.completions.messages.list(plain.id)
    assert [(m.role, m.content) for m in messages] == [(m["role"], m["content"]) for m in MESSAGES]
    assert client.chat.completions.update(last.id, metadata={"k": "v"}).metadata == {"k": "v"}
    assert client.chat.completions.delete(last.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(last.id)


def test_feedback_is_attached_listed_and_exported(site: Site) -> None:
    client = site.client("on")
    answer = _chat(client, ADAPTER, store=True, metadata={"topic": "feedback"})
    _wait_stored(client, answer.id)
    correction = "Hello! How can I help?"
    with site.http("on") as http:
        path = f"/v1/chat/completions/{answer.id}/feedback"
        given = [{"thumbs": "up", "rating": 4}, {"thumbs": "down", "correction": correction,
                                                 "note": "too curt"}]  # fmt: skip
        made = [http.post(path, json=body) for body in given]
        assert [r.status_code for r in made] == [200, 200], made[-1].text
        ids = [r.json()["id"] for r in made]
        assert [f["id"] for f in http.get(path).json()["data"]] == ids
        downs = http.get("/v1/feedback", params={"thumbs": "down"}).json()
        assert [f["id"] for f in downs["data"]] == [ids[1]]
        refused = http.post(path, json={"rating": 11})
        assert refused.status_code == 400, refused.text
        export = http.get("/v1/feedback/export", params={"completion_id": answer.id})
    assert export.status_code == 200
    lines = [json.loads(line) for line in export.text.splitlines()]
    assert [(line["id"], line["correction"]) for line in lines] == [
        (ids[0], None),
        (ids[1], correction),
    ]
    exported = lines[1]["completion"]
    assert exported["choices"][0]["message"]["content"] == answer.choices[0].message.content
    assert exported["loraplex"]["version"] == 1 and lines[1]["messages"] == MESSAGES


def test_another_tenant_gets_404_for_the_same_id_like_an_unknown_one(site: Site) -> None:
    owner = site.client("on")
    answer = _chat(owner, ADAPTER, store=True, metadata={"secret": "yes"})
    _wait_stored(owner, answer.id)
    unknown = "chatcmpl-" + "0" * (len(answer.id) - 9)
    calls: list[tuple[str, str, Any]] = [
        ("GET", "/v1/chat/completions/{}", None),
        ("GET", "/v1/chat/completions/{}/messages", None),
        ("POST", "/v1/chat/completions/{}", {"metadata": {"secret": "no"}}),
        ("POST", "/v1/chat/completions/{}/feedback", {"thumbs": "down"}),
        ("GET", "/v1/chat/completions/{}/feedback", None),
        ("DELETE", "/v1/chat/completions/{}", None),
    ]
    with site.http("other") as http:
        for method, path, body in calls:
            foreign = http.request(method, path.format(answer.id), json=body)
            never = http.request(method, path.format(unknown), json=body)
            assert foreign.status_code == 404, f"{method} {path}: {foreign.text}"
            assert foreign.text.replace(answer.id, unknown) == never.text
        assert http.get("/v1/chat/completions").json()["data"] == []
    with pytest.raises(openai.NotFoundError):
        site.client("other").chat.completions.retrieve(answer.id)
    kept = owner.chat.completions.retrieve(answer.id)
    assert kept.metadata == {"secret": "yes"}
    with site.http("on") as http:
        assert http.get(f"/v1/chat/completions/{answer.id}/feedback").json()["data"] == []


def test_a_tenant_with_capture_off_stores_nothing(site: Site) -> None:
    off = site.client("off")
    _chat(off, site.base_name, store=True)
    with pytest.raises(openai.BadRequestError, match="metadata"):
        _chat(off, site.base_name, store=True, metadata={"k": 7})  # checked all the same
    marker = _chat(site.client("on"), site.base_name, store=True)
    _wait_stored(site.client("on"), marker.id)
    assert off.chat.completions.list().data == []
    store = CaptureStore(site.registry)
    assert store.list_completions(site.tenants["off"].tenant_id, CompletionQuery()) == []


def test_large_bodies_go_to_the_blob_store_and_oversized_ones_are_dropped(site: Site) -> None:
    client = site.client("on")
    # The engine ignores fields it does not know: a large request of few tokens.
    big = _chat(client, site.base_name, store=True, extra_body={"padding": "p" * 20_000})
    small = site.client("small")
    _chat(small, site.base_name, store=True)  # its answer alone is over 300 bytes
    _wait_stored(client, big.id)
    row = CaptureStore(site.registry).get(site.tenants["on"].tenant_id, big.id)
    assert row.body is None and row.body_blob is not None and row.body_bytes > 20_000
    stored = client.chat.completions.retrieve(big.id)
    assert stored.choices[0].message.content == big.choices[0].message.content
    assert (stored.model_extra or {})["request"]["padding"] == "p" * 20_000
    assert small.chat.completions.list().data == []
    dropped = metric_samples(site.url, "loraplex_capture_dropped_total")
    mine = {"tenant": site.tenants["small"].name, "reason": "too_large"}
    assert [value for labels, value in dropped if labels == mine] == [1.0]


def test_feedback_becomes_a_dataset_version_and_erasing_a_user_removes_theirs(
    site: Site,
) -> None:
    """The loop's first turn on real answers: liked and corrected completions make a dataset
    version; erasing one end user deletes their completions and the examples they gave, and
    retraining without them makes a version without those (no job: none trained on it)."""
    client = site.client("on")
    tag = uuid.uuid4().hex[:8]
    liked = _chat(client, ADAPTER, store=True, metadata={"loop": tag}, user=f"alice-{tag}")
    fixed = _chat(client, ADAPTER, store=True, metadata={"loop": tag}, user=f"bob-{tag}")
    _wait_stored(client, fixed.id)
    correction = "Hello! How can I help you today?"
    name = f"loop-{tag}"
    with site.http("on") as http:
        for answer, body in ((liked, {"thumbs": "up"}), (fixed, {"correction": correction})):
            given = http.post(f"/v1/chat/completions/{answer.id}/feedback", json=body)
            assert given.status_code == 200, given.text
        assert http.post("/v1/datasets", json={"name": name}).status_code == 201
        wanted = {"adapter": ADAPTER, "metadata": {"loop": tag}}
        made = http.post(f"/v1/datasets/{name}/versions", json={"from_completions": wanted})
        assert made.status_code == 201, made.text
        assert (made.json()["number"], made.json()["examples"]) == (1, 2)
        examples = http.get(f"/v1/datasets/{name}/versions/1/examples").json()["data"]
        answers = [e["example"]["messages"][-1]["content"] for e in examples]
        assert answers == [liked.choices[0].message.content, correction]
        assert examples[0]["example"]["messages"][:-1] == MESSAGES

        erased = http.post("/v1/erasures", json={"user": f"alice-{tag}"})
        assert erased.status_code == 200, erased.text
        assert erased.json()["lineage"]["dataset_versions"] == [{"dataset": name, "version": 1}]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.retrieve(liked.id)
        client.chat.completions.retrieve(fixed.id)  # another user's: kept
        retrain = http.post(f"/v1/erasures/{erased.json()['id']}/retrain")
        assert retrain.status_code == 200 and retrain.json()["data"] == [], retrain.text
        after = http.get(f"/v1/datasets/{name}/versions/2")  # made without the erased example
        assert after.status_code == 200, after.text
        assert (after.json()["examples"], after.json()["removed"]) == (1, 1)
