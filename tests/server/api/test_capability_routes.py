"""Capability suite admin routes, gates with ``max_below_base`` over REST, and a job's
``answer_regex`` checked at creation (SQLite and PostgreSQL)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "registry"))
from registry_testdata import build_adapter, build_tiny_base

from registry import Actor, Registry
from registry.capability import MAX_EXAMPLES
from server.api import capability_routes, jobs_routes, registry_routes
from tests.server.api.conftest import client_for

ROOT = Actor("test-root", admin=True)
EXAMPLES = [{"prompt": "Capital of France?", "answer": "Paris."}]
SUITE = "/admin/bases/tiny/capability/generic"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    base = build_tiny_base(root / "base")
    return {"base": base, "v1": build_adapter(base, root / "v1", seed=1)}


class Site:
    def __init__(self, registry: Registry, tiny: dict[str, Path]) -> None:
        registry.register_base(tiny["base"], "tiny", "r1", ROOT)
        self.registry = registry
        self.client: TestClient = client_for(
            registry, capability_routes.routes, registry_routes.routes, jobs_routes.routes
        )
        _, admin = registry.create_api_key(None, "admin", ROOT)
        tenant = registry.create_tenant("acme", ROOT)
        assert tenant.id is not None
        self.tenant_id = tenant.id
        _, key = registry.create_api_key(tenant.id, "tenant", ROOT)
        self.admin = {"Authorization": f"Bearer {admin}"}
        self.acme = {"Authorization": f"Bearer {key}"}


@pytest.fixture
def site(registry: Registry, tiny: dict[str, Path]) -> Site:
    return Site(registry, tiny)


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_a_suite_is_set_shown_and_replaced_by_an_admin(site: Site) -> None:
    put = site.client.put(SUITE, json={"examples": EXAMPLES}, headers=site.admin)
    assert put.status_code == 200, put.text
    shown = site.client.get(SUITE, headers=site.admin).json()
    assert shown["object"] == "capability_suite" and shown["eval_suite"] == "capability:generic"
    assert shown["examples"] == EXAMPLES and shown["reference"] is None
    assert shown["created_by"].startswith("key:")
    assert site.client.get(SUITE, headers=site.acme).status_code == 403
    assert _error(site.client.get("/admin/bases/nope/capability/generic", headers=site.admin),
                  404)["code"] == "not_found"  # fmt: skip
    missing = site.client.get("/admin/bases/tiny/capability/other", headers=site.admin)
    assert "has no capability suite 'other'" in _error(missing, 404)["message"]


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        (b"{not json", 400, None, "not JSON"),
        (b'{"examples": {}}', 400, "examples", '{"examples": ['),
        (b'{"examples": [], "extra": 1}', 400, "extra", "unknown field(s): extra"),
        (b'{"examples": []}', 400, "examples", "at least one example"),
        (b'{"examples": [{"prompt": "a"}]}', 400, "examples", "'answer' must be a non-blank"),
    ],
)
def test_bad_suites_are_precise_400s_and_write_nothing(
    site: Site, body: bytes, status: int, param: str | None, words: str
) -> None:
    response = site.client.put(SUITE, content=body, headers=site.admin)
    error = _error(response, status)
    assert error["param"] == param and words in error["message"]
    assert site.client.get(SUITE, headers=site.admin).status_code == 404


def test_too_many_examples_and_a_bad_name_are_refused(site: Site) -> None:
    many = {"examples": EXAMPLES * (MAX_EXAMPLES + 1)}
    assert "at most 200" in _error(site.client.put(SUITE, json=many, headers=site.admin),
                                   400)["message"]  # fmt: skip
    bad = site.client.put("/admin/bases/tiny/capability/-x", json={"examples": EXAMPLES},
                          headers=site.admin)  # fmt: skip
    assert _error(bad, 400)["param"] == "name"
    unknown = site.client.put("/admin/bases/nope/capability/generic", json={"examples": EXAMPLES},
                              headers=site.admin)  # fmt: skip
    assert _error(unknown, 404)["code"] == "not_found"


def test_gates_take_max_below_base_on_capability_suites_only(
    site: Site, tiny: dict[str, Path]
) -> None:
    site.registry.push_adapter(site.tenant_id, "bot", tiny["v1"], "tiny", ROOT)
    gate = {"suite": "capability:generic", "metric": "exact_match", "max_below_base": 0.05}
    put = site.client.put("/v1/adapters/bot/gates", json={"gates": [gate]}, headers=site.acme)
    assert put.status_code == 200, put.text
    shown = site.client.get("/v1/adapters/bot/gates", headers=site.acme).json()["data"]
    assert shown[0]["max_below_base"] == 0.05
    wrong = {**gate, "suite": "fine-tune-test"}
    refused = site.client.put("/v1/adapters/bot/gates", json={"gates": [wrong]},
                              headers=site.acme)  # fmt: skip
    assert "capability suites only" in _error(refused, 400)["message"]
    promote = site.client.post("/v1/adapters/bot/promote", json={"version": 1}, headers=site.acme)
    assert "no eval result" in _error(promote, 409)["message"]


@pytest.mark.parametrize(
    ("regex", "words"), [("(", "not a valid regular expression"), ("a" * 1025, "at most 1024")]
)
def test_a_job_s_answer_regex_is_checked_when_it_is_created(
    site: Site, regex: str, words: str
) -> None:
    body = {"model": "tiny", "training_file": "file-x", "answer_regex": regex}
    error = _error(site.client.post("/v1/fine_tuning/jobs", json=body, headers=site.acme), 400)
    assert (error["param"], error["code"]) == ("answer_regex", "invalid_answer_regex")
    assert words in error["message"]
