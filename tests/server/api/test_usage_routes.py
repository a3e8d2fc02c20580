"""The usage API over HTTP (server/api/usage_routes.py, registry/usage.py) on SQLite and
PostgreSQL, across two tenants: each sees only its own counters, the admin everyone's or
one tenant's; day range and adapter filters; totals; CSV; bad ranges are precise 400s."""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest
from fastapi.testclient import TestClient

from registry import Actor, Registry
from server.api import usage_routes
from server.gateway.app import install_error_handlers
from tests.server.api.conftest import client_for, tenant_with_key

ROOT = Actor("test-root", admin=True)
DAY = dt.date(2025, 11, 30)


@pytest.fixture
def site(registry: Registry) -> tuple[TestClient, dict[str, dict[str, str]]]:
    """acme: bot v1 and v2 on two days, and the base model; globex: its own bot."""
    client = client_for(registry, usage_routes.routes)
    install_error_handlers(client.app)  # type: ignore[arg-type]
    acme, acme_key = tenant_with_key(registry, "acme")
    globex, globex_key = tenant_with_key(registry, "globex")
    book = registry.record_usage
    book(acme, "bot", 1, requests=3, prompt_tokens=30, completion_tokens=12, day=DAY)
    book(acme, "bot", 2, requests=1, prompt_tokens=5, completion_tokens=2, errors=1, day=DAY)
    book(acme, "", 0, requests=2, prompt_tokens=8, completion_tokens=4, day=DAY)
    book(acme, "bot", 2, requests=4, prompt_tokens=40, completion_tokens=16,
         day=DAY + dt.timedelta(days=1))  # fmt: skip
    book(globex, "bot", 1, requests=7, prompt_tokens=70, completion_tokens=7, day=DAY)
    admin = {"authorization": f"Bearer {registry.create_api_key(None, 'admin', ROOT)[1]}"}
    return client, {"acme": acme_key, "globex": globex_key, "admin": admin}


def _get(client: TestClient, path: str, headers: dict[str, str]) -> dict[str, object]:
    answer = client.get(path, headers=headers)
    assert answer.status_code == 200, answer.text
    body: dict[str, object] = answer.json()
    return body


def test_each_tenant_sees_its_own_usage_with_totals(
    site: tuple[TestClient, dict[str, dict[str, str]]],
) -> None:
    client, keys = site
    body = _get(client, "/v1/usage?since=2025-11-01&until=2025-12-05", keys["acme"])
    rows = body["data"]
    assert isinstance(rows, list)
    assert {(r["tenant"], r["day"], r["adapter"], r["version"], r["requests"]) for r in rows} == {
        ("acme", "2025-11-30", "", 0, 2), ("acme", "2025-11-30", "bot", 1, 3),
        ("acme", "2025-11-30", "bot", 2, 1), ("acme", "2025-12-01", "bot", 2, 4),
    }  # fmt: skip
    assert body["totals"] == {"requests": 10, "prompt_tokens": 83, "completion_tokens": 34,
                              "errors": 1}  # fmt: skip
    theirs = _get(client, "/v1/usage?since=2025-11-01&until=2025-12-05", keys["globex"])
    assert theirs["totals"] == {"requests": 7, "prompt_tokens": 70, "completion_tokens": 7,
                                "errors": 0}  # fmt: skip


def test_filters_by_day_range_and_adapter(
    site: tuple[TestClient, dict[str, dict[str, str]]],
) -> None:
    client, keys = site
    one_day = _get(client, "/v1/usage?since=2025-12-01&until=2025-12-01", keys["acme"])
    assert one_day["totals"] == {"requests": 4, "prompt_tokens": 40, "completion_tokens": 16,
                                 "errors": 0}  # fmt: skip
    base = _get(client, "/v1/usage?since=2025-11-01&until=2025-12-05&adapter=", keys["acme"])
    assert [r["adapter"] for r in base["data"]] == [""]  # type: ignore[union-attr]
    assert _get(client, "/v1/usage", keys["acme"])["data"] == []  # the last 30 days: none


def test_the_admin_reads_every_tenant_or_one_and_csv(
    site: tuple[TestClient, dict[str, dict[str, str]]],
) -> None:
    client, keys = site
    every = _get(client, "/admin/usage?since=2025-11-30&until=2025-11-30", keys["admin"])
    assert every["totals"]["requests"] == 13  # type: ignore[index]
    one = _get(client, "/admin/usage?tenant=globex&since=2025-11-30&until=2025-11-30",
               keys["admin"])  # fmt: skip
    assert {r["tenant"] for r in one["data"]} == {"globex"}  # type: ignore[union-attr]
    answer = client.get("/admin/usage?since=2025-11-30&until=2025-12-01&format=csv",
                        headers=keys["admin"])  # fmt: skip
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(answer.text)))
    assert len(table) == 5 and table[0].keys() == {
        "tenant", "day", "adapter", "version", "requests", "prompt_tokens",
        "completion_tokens", "errors",
    }  # fmt: skip
    assert sum(int(r["requests"]) for r in table) == 17


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("since=2025-12-05&until=2025-12-01", "after until"),
        ("since=2024-01-01&until=2025-12-01", "more than 366 days"),
        ("since=2026-13-01", "since"),
        ("format=xml", "format"),
    ],
)
def test_bad_queries_are_precise_400s(
    site: tuple[TestClient, dict[str, dict[str, str]]], query: str, words: str
) -> None:
    client, keys = site
    answer = client.get(f"/v1/usage?{query}", headers=keys["acme"])
    assert answer.status_code == 400, answer.text
    assert words in answer.json()["error"]["message"]


def test_keys_reach_only_their_own_kind_of_route(
    site: tuple[TestClient, dict[str, dict[str, str]]],
) -> None:
    client, keys = site
    assert client.get("/admin/usage", headers=keys["acme"]).status_code == 403
    assert client.get("/v1/usage", headers=keys["admin"]).status_code == 403
    assert client.get("/v1/usage").status_code == 401
    unknown = client.get("/admin/usage?tenant=nobody", headers=keys["admin"])
    assert unknown.status_code == 404
