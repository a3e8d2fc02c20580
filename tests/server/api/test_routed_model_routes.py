"""The routed-model routes over HTTP (server/api/routed_model_routes.py), on SQLite and
PostgreSQL: create, version, promote through gates, roll back, delete; routing evals and
replays decided by the gateway's real ContentRouter (rules-only policies: no engine call;
the classifier on a real engine is in tests/e2e/test_routed_models.py); refusals as
precise 4xx in OpenAI's shape; another tenant's routed model and adapters answer exactly
like unknown ones."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import router
from registry import Actor, Registry
from registry.captures import CaptureStore, NewCompletion
from registry.routed_models import RoutedModelStore
from server.api import routed_model_routes
from server.config import Settings
from server.gateway.app import install_error_handlers
from server.gateway.content_routing import ContentRouter
from server.gateway.forwarding import Forwarder
from server.gateway.metrics import Metrics
from server.gateway.replicas import Replicas
from server.gateway.tenancy import Tenancy, UsageBook
from tests.registry.registry_testdata import build_adapter, build_tiny_base
from tests.server.api.conftest import client_for, tenant_with_key

ROOT = Actor("test-root", admin=True)


def policy(default: str = "general", **extra: Any) -> dict[str, Any]:
    return {
        "default": default,
        "rules": [
            {"target": "billing", "keywords": ["invoice", "refund"]},
            {"target": "shipping", "pattern": r"(?i)\btrack"},
        ],
        **extra,
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("routed-routes")
    base = build_tiny_base(root / "tiny")
    return base, build_adapter(base, root / "a", seed=1)


@pytest.fixture
def acme(registry: Registry, built: tuple[Path, Path]) -> tuple[int, dict[str, str]]:
    """Tenant acme with adapters billing, shipping and general; tenant rival with secret."""
    tenant_id, headers = tenant_with_key(registry, "acme")
    registry.register_base(built[0], "tiny", "r1", ROOT)
    for name in ("billing", "shipping", "general"):
        registry.push_adapter(tenant_id, name, built[1], "tiny", ROOT)
        registry.promote(tenant_id, name, 1, ROOT)
    rival_id, _ = tenant_with_key(registry, "rival")
    registry.push_adapter(rival_id, "secret", built[1], "tiny", ROOT)
    return tenant_id, headers


@pytest.fixture
def client(registry: Registry) -> TestClient:
    client = client_for(registry, routed_model_routes.routes)
    install_error_handlers(client.app)  # type: ignore[arg-type]  # the gateway's 400s
    tenancy, settings = Tenancy(registry), Settings()
    forwarder = Forwarder(settings, Metrics())
    content = ContentRouter(
        RoutedModelStore(registry), tenancy, Replicas(router.Placer(), 4), forwarder,
        UsageBook(registry),
    )  # fmt: skip
    client.app.state.content_router = content  # type: ignore[attr-defined]
    return client


def _error(answer: Any, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    error: dict[str, Any] = answer.json()["error"]
    return error


def test_a_routed_model_is_created_versioned_promoted_and_rolled_back(
    client: TestClient, acme: tuple[int, dict[str, str]]
) -> None:
    _, headers = acme
    made = client.post(
        "/v1/routed_models", json={"name": "suite", "policy": policy()}, headers=headers
    )
    assert made.status_code == 201, made.text
    assert (made.json()["version"], made.json()["live"]) == (1, True)
    second = client.post(
        "/v1/routed_models/suite/versions", json={"policy": policy("billing")}, headers=headers
    )
    assert (second.status_code, second.json()["live"]) == (201, False)
    promoted = client.post("/v1/routed_models/suite/versions/2/promote", headers=headers)
    assert promoted.status_code == 200 and promoted.json()["live"] is True
    shown = client.get("/v1/routed_models/suite", headers=headers).json()
    assert (shown["live_version"], [v["version"] for v in shown["data"]]) == (2, [1, 2])
    back = client.post("/v1/routed_models/suite/rollback", headers=headers)
    assert back.status_code == 200 and back.json()["version"] == 1
    listed = client.get("/v1/routed_models", headers=headers).json()["data"]
    assert [(m["name"], m["live_version"]) for m in listed] == [("suite", 1)]
    again = client.post(
        "/v1/routed_models", json={"name": "suite", "policy": policy()}, headers=headers
    )
    assert "add a version" in _error(again, 409)["message"]
    assert client.delete("/v1/routed_models/suite", headers=headers).status_code == 204
    assert client.get("/v1/routed_models", headers=headers).json()["data"] == []


def test_an_invalid_policy_is_refused_with_every_problem_and_nothing_saved(
    client: TestClient, registry: Registry, acme: tuple[int, dict[str, str]]
) -> None:
    tenant_id, headers = acme
    bad = {"rules": [{"target": "billing", "pattern": "("}], "extra": True}
    answer = client.post(
        "/v1/routed_models", json={"name": "suite", "policy": bad}, headers=headers
    )
    error = _error(answer, 400)
    assert error["code"] == "invalid_routing_policy" and error["param"] == "policy"
    for problem in ("unknown field 'extra'", "default must name", "not a valid regular expression"):
        assert problem in error["message"]
    assert RoutedModelStore(registry).list(tenant_id) == []


def test_foreign_names_answer_exactly_like_unknown_ones(
    client: TestClient, registry: Registry, acme: tuple[int, dict[str, str]]
) -> None:
    tenant_id, headers = acme
    foreign = client.post(
        "/v1/routed_models", json={"name": "s", "policy": policy("secret")}, headers=headers
    )
    unknown = client.post(
        "/v1/routed_models", json={"name": "s", "policy": policy("nobody")}, headers=headers
    )
    assert _error(foreign, 400)["message"].replace("secret", "X") == _error(unknown, 400)[
        "message"
    ].replace("nobody", "X")
    assert RoutedModelStore(registry).list(tenant_id) == []
    _, rival_headers = tenant_with_key(registry, "third")
    client.post("/v1/routed_models", json={"name": "suite", "policy": policy()}, headers=headers)
    theirs = client.get("/v1/routed_models/suite", headers=rival_headers)
    nobody = client.get("/v1/routed_models/nothing", headers=rival_headers)
    assert _error(theirs, 404)["message"].replace("suite", "X") == _error(nobody, 404)[
        "message"
    ].replace("nothing", "X")
    for path in ("/versions/1/promote", "/rollback", "/versions/1/evals"):
        body = {"examples": [{"prompt": "x", "expected": "billing"}]}
        assert (
            client.post(
                f"/v1/routed_models/suite{path}", json=body, headers=rival_headers
            ).status_code
            == 404
        )


EXAMPLES = [
    {"messages": [{"role": "user", "content": "refund my invoice"}], "expected": "billing"},
    {"messages": [{"role": "user", "content": "track my parcel"}], "expected": "shipping"},
    {"messages": [{"role": "user", "content": "where is my box?"}], "expected": "shipping"},
    {"prompt": "hello there", "expected": "general"},
]


def test_a_routing_eval_is_stored_and_gates_the_promotion(
    client: TestClient, acme: tuple[int, dict[str, str]]
) -> None:
    _, headers = acme
    client.post("/v1/routed_models", json={"name": "suite", "policy": policy()}, headers=headers)
    gates = {"gates": [{"min_accuracy": 0.9}]}
    assert (
        client.put("/v1/routed_models/suite/gates", json=gates, headers=headers).status_code == 200
    )
    better = policy()
    better["rules"].append({"target": "shipping", "keywords": ["box"]})
    client.post("/v1/routed_models/suite/versions", json={"policy": better}, headers=headers)
    refused = client.post("/v1/routed_models/suite/versions/2/promote", headers=headers)
    assert "record a routing eval first" in _error(refused, 409)["message"]
    first = client.post(
        "/v1/routed_models/suite/versions/1/evals", json={"examples": EXAMPLES}, headers=headers
    )
    assert first.status_code == 200, first.text
    assert (first.json()["accuracy"], first.json()["examples"]) == (0.75, 4)
    assert first.json()["confusion"]["shipping"] == {"shipping": 1, "general": 1}
    second = client.post(
        "/v1/routed_models/suite/versions/2/evals", json={"examples": EXAMPLES}, headers=headers
    )
    assert second.json()["accuracy"] == 1.0
    promoted = client.post("/v1/routed_models/suite/versions/2/promote", headers=headers)
    assert promoted.status_code == 200, promoted.text
    history = client.get("/v1/routed_models/suite/evals", headers=headers).json()["data"]
    assert [(e["version"], e["accuracy"]) for e in history] == [(1, 0.75), (2, 1.0)]


def test_a_worse_version_fails_its_gate(
    client: TestClient, acme: tuple[int, dict[str, str]]
) -> None:
    _, headers = acme
    client.post("/v1/routed_models", json={"name": "suite", "policy": policy()}, headers=headers)
    client.put(
        "/v1/routed_models/suite/gates", json={"gates": [{"min_accuracy": 0.7}]}, headers=headers
    )
    client.post(
        "/v1/routed_models/suite/versions", json={"policy": policy("billing")}, headers=headers
    )
    evals = client.post(
        "/v1/routed_models/suite/versions/2/evals", json={"examples": EXAMPLES}, headers=headers
    )
    assert evals.json()["accuracy"] == 0.5
    refused = client.post("/v1/routed_models/suite/versions/2/promote", headers=headers)
    error = _error(refused, 409)
    assert error["code"] == "gate_failed" and "0.5" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"examples": []}, "examples"),
        ({"examples": [{"prompt": "x"}]}, "examples"),
        ({"examples": [{"expected": "billing"}]}, "examples"),
        ({}, "examples"),
    ],
)
def test_bad_eval_examples_are_refused(
    client: TestClient, acme: tuple[int, dict[str, str]], body: dict[str, Any], param: str
) -> None:
    _, headers = acme
    client.post("/v1/routed_models", json={"name": "suite", "policy": policy()}, headers=headers)
    answer = client.post("/v1/routed_models/suite/versions/1/evals", json=body, headers=headers)
    assert _error(answer, 400)["param"] == param
    assert client.get("/v1/routed_models/suite/evals", headers=headers).json()["data"] == []


def test_a_replay_decides_stored_traffic_with_both_versions(
    client: TestClient, registry: Registry, acme: tuple[int, dict[str, str]]
) -> None:
    tenant_id, headers = acme
    client.post("/v1/routed_models", json={"name": "suite", "policy": policy()}, headers=headers)
    client.post(
        "/v1/routed_models/suite/versions", json={"policy": policy("billing")}, headers=headers
    )
    captures = CaptureStore(registry)
    for index, example in enumerate(EXAMPLES):
        request = {"model": "suite", **{k: v for k, v in example.items() if k != "expected"}}
        record = NewCompletion(
            tenant_id, f"chatcmpl-{index}", "suite", "general", 1, "production", None, {},
            False, 1, 1, dt.datetime.now(dt.UTC), request, {"choices": []},
        )  # fmt: skip
        captures.save([record])
    answer = client.post("/v1/routed_models/suite/versions/2/replay", json={}, headers=headers)
    assert answer.status_code == 200, answer.text
    replay = answer.json()
    assert (replay["requests"], replay["agreed"], replay["live_version"]) == (4, 2, 1)
    assert replay["changes"]["general"] == {"billing": 2}
