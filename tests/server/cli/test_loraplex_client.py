"""``server.client.LoraplexClient`` against the real tenant routes, in-process.

The app holds the registry, files/jobs and usage routers and the gateway's error handler on
a SQLite registry; the client reaches it through Starlette's TestClient (an httpx client).
Retries are checked on httpx's MockTransport, where the answers can be scripted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from registry import Actor, LocalBlobStore, Registry
from server.api import jobs_routes, registry_routes, usage_routes
from server.cli.entry import main as entry
from server.cli.remote_commands import gate_spec, hint, wants_remote
from server.client import GateRule, LoraplexClient, LoraplexError, Progress
from server.errors import install_api_error_handler
from tests.registry.registry_testdata import build_adapter, build_tiny_base

ROOT = Actor("test-root", admin=True)
TRAIN = "".join(
    json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i}."}) + "\n" for i in range(8)
)


@pytest.fixture(scope="module")
def peft(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft")
    base = build_tiny_base(root / "base")
    return {"base": base, **{f"v{i}": build_adapter(base, root / f"v{i}", seed=i) for i in (1, 2)}}


@pytest.fixture
def registry(tmp_path: Path, peft: dict[str, Path]) -> Iterator[Registry]:
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "blobs"))
    registry.register_base(peft["base"], "tiny", "r1", ROOT)
    yield registry
    registry.close()


@pytest.fixture
def http(registry: Registry) -> httpx.Client:
    app = FastAPI()
    install_api_error_handler(app)
    app.state.registry = registry
    for router in (registry_routes.routes, jobs_routes.routes, usage_routes.routes):
        app.include_router(router)
    return cast(httpx.Client, TestClient(app))  # an httpx.Client that mypy cannot see as one


def _key(registry: Registry, tenant: str) -> str:
    tenant_id = registry.create_tenant(tenant, ROOT).id
    return registry.create_api_key(tenant_id, "tenant", ROOT)[1]


@pytest.fixture
def acme(registry: Registry, http: httpx.Client) -> LoraplexClient:
    return LoraplexClient("http://testserver", _key(registry, "acme"), http=http)


def test_an_adapter_goes_from_push_through_its_lifecycle(
    acme: LoraplexClient, peft: dict[str, Path]
) -> None:
    seen: list[tuple[int, int]] = []
    v1 = acme.push_adapter(peft["v1"], "bot", "tiny", description="a bot", progress=_record(seen))
    assert (v1.version, v1.state) == (1, "active")
    assert seen and seen[-1][0] == seen[-1][1] > 0, "progress ends at every byte sent"
    assert acme.push_adapter(peft["v2"], "bot", "tiny").version == 2
    assert [a.name for a in acme.list_adapters()] == ["bot"]
    assert acme.promote("bot", 1).version == 1
    assert acme.canary("bot", 2, 0.25).version == 2
    shown = acme.get_adapter("bot")
    assert shown.description == "a bot"
    assert (shown.aliases["production"].version, shown.aliases["canary"].weight) == (1, 0.25)
    assert [v.version for v in shown.versions] == [1, 2]
    acme.clear_canary("bot")
    acme.promote("bot", 2)
    assert acme.rollback("bot").version == 1
    assert acme.retire("bot", 2).state == "retired"
    assert [v.state for v in acme.list_versions("bot")] == ["active", "retired"]


def _record(seen: list[tuple[int, int]]) -> Progress:
    return lambda sent, total: seen.append((sent, total))


def test_gates_refuse_a_promotion_until_an_eval_passes(
    acme: LoraplexClient, peft: dict[str, Path]
) -> None:
    acme.push_adapter(peft["v1"], "bot", "tiny")
    gates = acme.set_gates("bot", [GateRule("qa", "accuracy", min_value=0.8)])
    assert acme.get_gates("bot") == gates == [GateRule("qa", "accuracy", min_value=0.8)]
    with pytest.raises(LoraplexError) as refused:
        acme.promote("bot", 1)
    assert (refused.value.status, refused.value.code) == (409, "gate_failed")
    assert "accuracy" in refused.value.message
    acme.add_eval("bot", 1, "qa", "accuracy", 0.9, sample_count=50)
    assert [(r.metric, r.value) for r in acme.eval_results("bot", 1)] == [("accuracy", 0.9)]
    assert acme.promote("bot", 1).version == 1
    history = acme.eval_history("bot")
    assert [(h.version, h.aliases, h.evals[0].value) for h in history] == [(1, ["production"], 0.9)]


def test_errors_carry_the_servers_status_code_and_message(
    registry: Registry, http: httpx.Client, acme: LoraplexClient, peft: dict[str, Path]
) -> None:
    bad = LoraplexClient("http://testserver", "lpx-not-a-real-key", http=http)
    with pytest.raises(LoraplexError) as refused:
        bad.list_adapters()
    assert (refused.value.status, refused.value.code) == (401, "invalid_api_key")
    assert "LORAPLEX_API_KEY" in hint(refused.value, "http://testserver")
    assert "lpx-not-a-real-key" not in repr(bad) + str(refused.value)
    acme.push_adapter(peft["v1"], "bot", "tiny")
    globex = LoraplexClient("http://testserver", _key(registry, "globex"), http=http)
    with pytest.raises(LoraplexError) as foreign:
        globex.get_adapter("bot")
    with pytest.raises(LoraplexError) as unknown:
        globex.get_adapter("nothing-here")
    assert foreign.value.status == unknown.value.status == 404
    with pytest.raises(LoraplexError) as invalid:
        acme.canary("bot", 1, 2.0)
    assert invalid.value.status == 422 and "weight" in invalid.value.message


def test_files_jobs_events_and_checkpoints(acme: LoraplexClient, tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(TRAIN)
    uploaded = acme.upload_file(path)
    assert (uploaded.filename, uploaded.line_count) == ("train.jsonl", 8)
    assert [f.id for f in acme.list_files()] == [uploaded.id] == [acme.get_file(uploaded.id).id]
    job = acme.create_job("tiny", uploaded.id, suffix="tuned", hyperparameters={"n_epochs": 1})
    assert (job.status, job.adapter_name, job.finished) == ("queued", "tuned", False)
    assert [j.id for j in acme.list_jobs()] == [job.id]
    assert acme.cancel_job(job.id).status == "cancelled"
    followed = list(acme.follow_job_events(job.id, poll_interval=0))
    assert followed, "a job has events (queued, no worker, cancelled)"
    assert [e.number for e in followed] == sorted(e.number for e in followed)
    assert followed[-1].message == "Job cancelled"
    assert acme.events_since(job.id, followed[-1].number) == []
    assert acme.list_checkpoints(job.id) == []


def test_usage_as_a_report_and_as_csv(acme: LoraplexClient) -> None:
    report = acme.usage(since=dt.date(2025, 1, 1), until=dt.date(2025, 1, 31))
    assert (report.since, report.until, report.lines) == ("2025-01-01", "2025-01-31", [])
    assert report.totals["requests"] == 0
    assert acme.usage_csv().startswith("tenant,day,adapter,version,requests")


def _scripted(answers: list[httpx.Response], sleeps: list[float]) -> LoraplexClient:
    def answer(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    http = httpx.Client(transport=httpx.MockTransport(answer))
    return LoraplexClient("http://gw", "k", http=http, max_retries=2, sleep=sleeps.append)


def _error(status: int, code: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    body = {"error": {"message": f"{code} now", "type": "x", "param": None, "code": code}}
    return httpx.Response(status, json=body, headers=headers)


def test_retryable_answers_are_retried_after_the_wait_the_server_asks() -> None:
    sleeps: list[float] = []
    ok = httpx.Response(200, json={"object": "list", "data": []})
    client = _scripted([_error(503, "no_engine", "5"), _error(429, "rate", "1"), ok], sleeps)
    assert client.list_adapters() == [] and sleeps == [5.0, 1.0]
    sleeps.clear()
    client = _scripted([_error(503, "x", "2")] * 3, sleeps)
    with pytest.raises(LoraplexError) as exhausted:
        client.list_files()
    assert (exhausted.value.status, exhausted.value.retry_after, sleeps) == (503, 2.0, [2.0, 2.0])
    assert exhausted.value.retryable
    client = _scripted([_error(429, "max_total_tokens_exceeded")], sleeps := [])
    with pytest.raises(LoraplexError) as final:
        client.list_files()
    assert sleeps == [] and not final.value.retryable, "no Retry-After: retrying cannot help"


def test_an_unreachable_gateway_is_a_connection_error() -> None:
    with pytest.raises(LoraplexError) as down:
        LoraplexClient("http://127.0.0.1:9", "k", timeout=2).list_adapters()
    assert (down.value.status, down.value.code) == (None, "connection_error")
    assert "LORAPLEX_URL" in hint(down.value, "http://127.0.0.1:9")


def test_the_cli_goes_over_http_only_with_a_url_and_a_customer_command() -> None:
    assert wants_remote(["--url", "http://gw", "adapters", "list"], {})
    assert wants_remote(["--url=http://gw", "--json", "jobs", "follow", "x"], {})
    assert wants_remote(["usage"], {"LORAPLEX_URL": "http://gw"})
    assert not wants_remote(["adapters", "list", "--tenant", "acme"], {})
    assert not wants_remote(["--url", "http://gw", "tenants", "list"], {})
    assert not wants_remote(["migrate"], {"LORAPLEX_URL": "http://gw"})


def test_gate_specs() -> None:
    assert gate_spec("qa:accuracy,min_value=0.8") == GateRule("qa", "accuracy", min_value=0.8)
    assert gate_spec("perf:latency,max_regression=5,lower_is_better") == GateRule(
        "perf", "latency", max_regression=5.0, higher_is_better=False
    )
    for bad in ("accuracy", "qa:accuracy,min=1", "qa:accuracy,min_value=high"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"SUITE:METRIC|min_value|no number"):
            gate_spec(bad)


def test_the_light_entry_runs_a_customer_command_and_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["loraplex", "--url", "http://127.0.0.1:9", "--api-key", "secret-key", "jobs", "list"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        entry()
    out, err = capsys.readouterr()
    assert exited.value.code == 1 and out == ""
    assert "cannot reach the gateway" in err and "check LORAPLEX_URL" in err
    assert "secret-key" not in err
