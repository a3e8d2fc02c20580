"""Custom aliases, version tags and the search over both over HTTP
(server/api/alias_routes.py), on SQLite and PostgreSQL: set, move, list, delete; the
pre-warm before traffic; refusals as precise 4xx in OpenAI's shape; the admin's routes act
for a named tenant; a foreign adapter answers exactly like an unknown one, and search
never answers another tenant's versions."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from registry import Actor, Registry
from server.api import registry_routes
from server.gateway.app import install_error_handlers
from tests.registry.registry_testdata import build_adapter, build_tiny_base
from tests.server.api.conftest import client_for, tenant_with_key

ROOT = Actor("test-root", admin=True)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The tiny base, then two adapters on it."""
    root = tmp_path_factory.mktemp("alias-routes")
    base = build_tiny_base(root / "tiny")
    return [base, *(build_adapter(base, root / f"v{n}", seed=n) for n in (1, 2))]


@pytest.fixture
def acme(registry: Registry, weights: list[Path]) -> tuple[int, dict[str, str]]:
    """Tenant acme (its id and key headers), its bot with versions 1 (production) and 2."""
    tenant_id, headers = tenant_with_key(registry, "acme")
    registry.register_base(weights[0], "tiny", "r1", ROOT)
    for path in weights[1:]:
        registry.push_adapter(tenant_id, "bot", path, "tiny", ROOT)
    registry.promote(tenant_id, "bot", 1, ROOT)
    return tenant_id, headers


class Hooks:
    """Records the pre-warms the routes ask for."""

    def __init__(self) -> None:
        self.warmed: list[tuple[int, str, int]] = []

    def before_traffic(self, tenant_id: int, adapter: str, number: int) -> None:
        self.warmed.append((tenant_id, adapter, number))

    def after_retire(self, lora_name: str) -> None:
        pass


@pytest.fixture
def client(registry: Registry) -> TestClient:
    client = client_for(registry, registry_routes.routes)
    install_error_handlers(client.app)  # type: ignore[arg-type]  # the gateway's 400s
    client.app.state.lifecycle_hooks = Hooks()  # type: ignore[attr-defined]
    return client


def test_a_custom_alias_is_set_moved_listed_and_deleted(
    registry: Registry, client: TestClient, acme: tuple[int, dict[str, str]]
) -> None:
    tenant_id, headers = acme
    path = "/v1/adapters/bot/aliases/staging"
    answer = client.put(path, json={"version": 2}, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json() | {"updated_at": ""} == {
        "object": "adapter.alias", "alias": "staging", "version": 2, "weight": 1.0,
        "built_in": False, "updated_at": "",
    }  # fmt: skip
    assert client.app.state.lifecycle_hooks.warmed == [(tenant_id, "bot", 2)]  # type: ignore[attr-defined]
    assert client.put(path, json={"version": 1}, headers=headers).json()["version"] == 1
    listed = client.get("/v1/adapters/bot/aliases", headers=headers).json()["data"]
    assert [(a["alias"], a["version"], a["built_in"]) for a in listed] == [
        ("production", 1, True), ("staging", 1, False),
    ]  # fmt: skip
    history = client.get(path, headers=headers).json()["history"]
    assert [(h["version"], h["previous_version"]) for h in history] == [(2, None), (1, 2)]
    shown = client.get("/v1/adapters/bot", headers=headers).json()["aliases"]
    assert shown["staging"]["version"] == 1
    assert client.delete(path, headers=headers).status_code == 204
    gone = client.delete(path, headers=headers)
    assert gone.status_code == 404 and "no alias 'staging'" in gone.json()["error"]["message"]
    assert "staging" not in registry.aliases(tenant_id, "bot")


@pytest.mark.parametrize(
    ("alias", "body", "status", "words"),
    [
        ("production", {"version": 2}, 400, "loraplex adapters promote"),
        ("canary", {"version": 2}, 400, "loraplex adapters canary"),
        ("shadow", {"version": 2}, 400, "loraplex adapters shadow"),
        ("-bad", {"version": 2}, 400, "not valid"),
        ("staging", {"version": 9}, 404, "no version 9"),
        ("staging", {}, 400, "version"),
    ],
)
def test_bad_alias_requests_are_precise_4xx_and_change_nothing(
    registry: Registry,
    client: TestClient,
    acme: tuple[int, dict[str, str]],
    alias: str,
    body: dict[str, int],
    status: int,
    words: str,
) -> None:
    tenant_id, headers = acme
    answer = client.put(f"/v1/adapters/bot/aliases/{alias}", json=body, headers=headers)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]["message"]
    assert registry.aliases(tenant_id, "bot").keys() == {"production"}
    if status == 400 and body:
        assert client.app.state.lifecycle_hooks.warmed == []  # type: ignore[attr-defined]


def test_an_aliased_version_is_not_retired_and_a_retired_one_not_aliased(
    registry: Registry, client: TestClient, acme: tuple[int, dict[str, str]]
) -> None:
    _, headers = acme
    client.put("/v1/adapters/bot/aliases/staging", json={"version": 2}, headers=headers)
    refused = client.post("/v1/adapters/bot/versions/2/retire", headers=headers)
    assert refused.status_code == 409 and "staging" in refused.json()["error"]["message"]
    client.delete("/v1/adapters/bot/aliases/staging", headers=headers)
    assert client.post("/v1/adapters/bot/versions/2/retire", headers=headers).status_code == 200
    again = client.put("/v1/adapters/bot/aliases/staging", json={"version": 2}, headers=headers)
    assert again.status_code == 409 and "retired" in again.json()["error"]["message"]


def test_tags_are_set_shown_deleted_and_searched_with_aliases(
    client: TestClient, acme: tuple[int, dict[str, str]]
) -> None:
    _, headers = acme
    tags = "/v1/adapters/bot/versions/{}/tags"
    two = {"tags": {"team": "search", "ds": "nov"}}
    answer = client.put(tags.format(2), json=two, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["tags"] == {"ds": "nov", "team": "search"}
    client.put(tags.format(1), json={"tags": {"team": "search"}}, headers=headers)
    client.put("/v1/adapters/bot/aliases/staging", json={"version": 2}, headers=headers)

    def search(query: str) -> list[tuple[str, int]]:
        found = client.get(f"/v1/adapters?{query}", headers=headers)
        assert found.status_code == 200, found.text
        return [(v["adapter"], v["version"]) for v in found.json()["data"]]

    assert search("tag=team=search") == [("bot", 1), ("bot", 2)]
    assert search("tag=team=search&tag=ds") == [("bot", 2)]
    assert search("alias=staging") == [("bot", 2)]
    assert search("tag=team=search&alias=production") == [("bot", 1)]
    assert search("tag=ds=dec") == []
    hit = client.get("/v1/adapters?alias=staging", headers=headers).json()["data"][0]
    assert (hit["object"], hit["tags"], hit["aliases"]) == (
        "adapter.version", {"ds": "nov", "team": "search"}, ["staging"],
    )  # fmt: skip
    assert client.delete(tags.format(2) + "/ds", headers=headers).status_code == 204
    assert client.get(tags.format(2), headers=headers).json()["tags"] == {"team": "search"}
    gone = client.delete(tags.format(2) + "/ds", headers=headers)
    assert gone.status_code == 404 and "no tag 'ds'" in gone.json()["error"]["message"]
    bad = client.put(tags.format(2), json={"tags": {"-x": "1", "y": "a\nb"}}, headers=headers)
    assert bad.status_code == 400
    assert "'-x'" in bad.json()["error"]["message"] and "control" in bad.json()["error"]["message"]
    wrong = client.get("/v1/adapters?tag==x", headers=headers)
    assert wrong.status_code == 400 and "tag filter" in wrong.json()["error"]["message"]


def test_the_admin_acts_for_a_named_tenant(
    registry: Registry, client: TestClient, acme: tuple[int, dict[str, str]]
) -> None:
    tenant_id, _ = acme
    admin = {"authorization": f"Bearer {registry.create_api_key(None, 'admin', ROOT)[1]}"}
    prefix = "/admin/tenants/acme/adapters"
    put = client.put(f"{prefix}/bot/aliases/staging", json={"version": 2}, headers=admin)
    assert put.status_code == 200, put.text
    assert registry.aliases(tenant_id, "bot")["staging"].version == 2
    tagged = client.put(f"{prefix}/bot/versions/2/tags", json={"tags": {"a": "b"}}, headers=admin)
    assert tagged.status_code == 200
    found = client.get(f"{prefix}?tag=a=b&alias=staging", headers=admin).json()["data"]
    assert [(v["adapter"], v["version"]) for v in found] == [("bot", 2)]
    assert client.delete(f"{prefix}/bot/aliases/staging", headers=admin).status_code == 204
    audit = registry.audit_log(tenant_id=tenant_id, action="adapter.alias_delete")
    assert [e.actor.startswith("key:") for e in audit] == [True]


def test_a_foreign_adapter_answers_exactly_like_an_unknown_one(
    registry: Registry, client: TestClient, acme: tuple[int, dict[str, str]]
) -> None:
    _, headers = acme
    client.put("/v1/adapters/bot/aliases/staging", json={"version": 2}, headers=headers)
    client.put("/v1/adapters/bot/versions/2/tags", json={"tags": {"a": "b"}}, headers=headers)
    _, globex = tenant_with_key(registry, "globex")
    for method, path, json in [
        ("GET", "aliases", None),
        ("GET", "aliases/staging", None),
        ("PUT", "aliases/staging", {"version": 1}),
        ("DELETE", "aliases/staging", None),
        ("GET", "versions/2/tags", None),
        ("PUT", "versions/2/tags", {"tags": {"x": "y"}}),
        ("DELETE", "versions/2/tags/a", None),
    ]:
        answers = [
            client.request(method, f"/v1/adapters/{name}/{path}", json=json, headers=globex)
            for name in ("bot", "nothing")
        ]
        assert [a.status_code for a in answers] == [404, 404], (method, path)
        messages = [a.json()["error"]["message"].replace("nothing", "bot") for a in answers]
        assert messages[0] == messages[1], (method, path)
    for query in ("tag=a=b", "alias=staging", "tag=a&alias=production"):
        found = client.get(f"/v1/adapters?{query}", headers=globex)
        assert found.status_code == 200 and found.json()["data"] == [], query
