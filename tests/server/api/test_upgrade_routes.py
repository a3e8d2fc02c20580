"""Base upgrades over HTTP, on SQLite and PostgreSQL: the dry run, the start, the admin's
view and advance, the tenant's view (its own items only) and choice (another tenant's
adapter answered exactly like one not in the upgrade), cancel, and the error shapes."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from registry import Registry
from server.api import upgrade_routes
from tests.registry.registry_testdata import BASE_NAME, build_adapter, build_tiny_base
from tests.registry.upgrade_testdata import NEW_NAME, OPERATOR, Fleet
from tests.server.api.conftest import client_for, tenant_with_key


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("upgrade-routes")
    old = build_tiny_base(root / "old")
    made = {f"v{i}": build_adapter(old, root / f"v{i}", seed=i) for i in (1, 2, 3)}
    return {"old": old, "new": build_tiny_base(root / "new", layers=3), **made}


@pytest.fixture
def setup(registry: Registry, dirs: dict[str, Path]) -> tuple[TestClient, Fleet, dict[str, Any]]:
    registry.register_base(dirs["old"], BASE_NAME, "r1", OPERATOR)
    registry.register_base(dirs["new"], NEW_NAME, "r1", OPERATOR)
    acme, acme_key = tenant_with_key(registry, "acme")
    other, other_key = tenant_with_key(registry, "other")
    fleet = Fleet(registry, dirs, acme, other)
    admin_key = registry.create_api_key(None, "admin", OPERATOR)[1]
    headers = {"admin": {"authorization": f"Bearer {admin_key}"}, "acme": acme_key,
               "other": other_key}  # fmt: skip
    return client_for(registry, upgrade_routes.routes), fleet, headers


def _start(http: TestClient, admin: dict[str, str], **options: Any) -> dict[str, Any]:
    deadline = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    body = {"old_base": BASE_NAME, "new_base": NEW_NAME, "deadline": deadline, **options}
    response = http.post("/admin/bases/upgrades", json=body, headers=admin)
    assert response.status_code == 200, response.text
    started: dict[str, Any] = response.json()
    return started


def test_dry_run_start_view_advance_choose_and_cancel(
    setup: tuple[TestClient, Fleet, dict[str, Any]],
) -> None:
    http, fleet, keys = setup
    plan = _start(http, keys["admin"], dry_run=True)
    assert plan["object"] == "base.upgrade.plan" and len(plan["items"]) == 4
    assert http.get("/admin/bases/upgrades", headers=keys["admin"]).json()["data"] == []
    started = _start(http, keys["admin"], canary_seconds=0, uploaded_past_deadline="retire")
    uid = started["id"]
    assert started["state"] == "running" and started["progress"] == {
        "total": 4, "final": 0, "planned": 4,
    }  # fmt: skip
    advanced = http.post(f"/admin/bases/upgrades/{uid}/advance", headers=keys["admin"]).json()
    states = {t["adapter"]: t["state"] for t in advanced["transitions"]}
    assert states == {"bot": "evaluating", "easy": "evaluating", "up": "awaiting",
                      "theirs": "awaiting"}  # fmt: skip
    easy = next(i for i in advanced["upgrade"]["items"] if i["adapter"] == "easy")
    fleet.evaluated(easy["eval_job"], 0.9)
    http.post(f"/admin/bases/upgrades/{uid}/advance", headers=keys["admin"])
    mine = http.get("/v1/upgrades", headers=keys["acme"]).json()["data"]
    assert [i["adapter"] for i in mine[0]["items"]] == ["bot", "easy", "up"]
    assert "report" not in mine[0] and mine[0]["deadline"]
    theirs = http.get("/v1/upgrades", headers=keys["other"]).json()["data"]
    assert [i["adapter"] for i in theirs[0]["items"]] == ["theirs"]
    choice = f"/v1/upgrades/{uid}/adapters/easy/choice"
    foreign = http.post(choice, json={"choice": "retire"}, headers=keys["other"])
    unknown = http.post(choice.replace("easy", "nope"), json={"choice": "retire"},
                        headers=keys["acme"])  # fmt: skip
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json()["error"]["message"] == unknown.json()["error"]["message"].replace(
        "nope", "easy"
    )
    bad = http.post(choice, json={"choice": "delete"}, headers=keys["acme"])
    assert bad.status_code == 400 and "'retire' or 'retrain'" in bad.json()["error"]["message"]
    chosen = http.post(choice, json={"choice": "retire"}, headers=keys["acme"]).json()
    assert next(i for i in chosen["items"] if i["adapter"] == "easy")["state"] == "retired"
    assert http.get("/admin/bases/upgrades", headers=keys["acme"]).status_code == 403
    cancelled = http.post(f"/admin/bases/upgrades/{uid}/cancel", headers=keys["admin"]).json()
    assert cancelled["state"] == "cancelled" and cancelled["report"]["items"]["retired"] == [
        "acme/easy"
    ]
    again = http.post(f"/admin/bases/upgrades/{uid}/cancel", headers=keys["admin"])
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"


def test_bad_options_and_unknown_ids(setup: tuple[TestClient, Fleet, dict[str, Any]]) -> None:
    http, _, keys = setup
    body = {"old_base": BASE_NAME, "new_base": NEW_NAME, "canary_weight": 3, "bar_margin": -1}
    refused = http.post("/admin/bases/upgrades", json=body, headers=keys["admin"])
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]
    assert "canary_weight" in message and "bar_margin" in message
    extra = http.post("/admin/bases/upgrades", json={**body, "typo": 1}, headers=keys["admin"])
    assert extra.status_code in (400, 422)
    missing = http.get("/admin/bases/upgrades/upg_nothing", headers=keys["admin"])
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
