"""A base upgrade end to end on the loopback fleet (``server.dev.fleet``): PostgreSQL,
SeaweedFS as S3, Redis, a vLLM engine and a fine-tuning worker per base, a gateway.

One tenant has three adapters on the demo base (OLD), each in production: ``trained``
(a fine-tuning job on OLD learnt a fixed answer), ``noop`` (a job that learnt nothing:
its held-out score is the base's, so the new base alone meets its bar) and ``up``
(uploaded: it cannot be retrained). The operator upgrades OLD to the small demo base
(NEW) with a deadline: ``trained`` is evaluated on NEW alone, retrained there by an
ordinary job, compared through the gates, canaried and promoted; ``noop``'s owner chooses
to retire it; ``up``'s owner is told by a signed webhook and it is retired at the
deadline. Requests for ``trained`` keep succeeding through the move, and every version
on OLD ends retired.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from registry import ADMIN_SCOPE
from server.dev.demo_site import random_adapter, upload_and_promote
from server.dev.fleet import OPERATOR, Fleet, FleetConfig
from tests.e2e.conftest import running_fleet
from tests.server.webhooks.test_delivery import Receiver
from tests.training.training_testdata import chat_records, jsonl

OPERATOR_NAME = "upgrade-operator"
WITHIN = 900.0
"""Seconds the whole move may take on a loaded 2-core machine (jobs train on CPU)."""


@pytest.fixture(scope="module")
def fleet(
    demo_base: Path, small_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    config = FleetConfig(
        tmp_path_factory.mktemp("upgrade-fleet"),
        [demo_base, small_base],
        database=f"loraplex_upgrade_{uuid.uuid4().hex[:10]}",
        gateways=1,
        extra_env={"LORAPLEX_WEBHOOK_ALLOW": "127.0.0.1", "LORAPLEX_WEBHOOK_INTERVAL": "0.2"},
    )
    with running_fleet(config) as fleet:
        yield fleet


class Site:
    """The tenant's and the operator's HTTP clients on the fleet's gateway."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.url = fleet.gateways[0].url
        self.key = fleet.create_tenant("upgrading")
        registry = fleet.registry()
        try:
            admin = registry.create_api_key(None, ADMIN_SCOPE, OPERATOR, OPERATOR_NAME)[1]
        finally:
            registry.close()
        self.tenant = httpx.Client(base_url=self.url, headers=_bearer(self.key), timeout=120)
        self.admin = httpx.Client(base_url=self.url, headers=_bearer(admin), timeout=120)
        self.openai = OpenAI(
            base_url=self.url + "/v1", api_key=self.key, max_retries=0, timeout=120
        )
        self.old, self.new = fleet.base_names

    def train(self, suffix: str, hyperparameters: dict[str, Any]) -> str:
        """A job on OLD on 48 chat examples that all answer "Banana." (exact match decides)."""
        file = self.openai.files.create(
            file=(f"{suffix}.jsonl", jsonl(chat_records(48))), purpose="fine-tune"
        )
        method: Any = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
        job = self.openai.fine_tuning.jobs.create(
            model=self.old, training_file=file.id, suffix=suffix, seed=0, method=method
        )
        return job.id

    def wait_job(self, job_id: str) -> None:
        deadline = time.monotonic() + WITHIN
        while time.monotonic() < deadline:
            job = self.openai.fine_tuning.jobs.retrieve(job_id)
            if job.status == "succeeded":
                return
            assert job.status not in ("failed", "cancelled"), f"{job_id}: {job.error}"
            time.sleep(2)
        raise AssertionError(f"job {job_id} did not end within {WITHIN} s")

    def in_production(self, adapter: str) -> None:
        """Promote the adapter's latest version unless a job already did."""
        shown = self.tenant.get(f"/v1/adapters/{adapter}").json()
        latest = max(v["version"] for v in shown["versions"])
        production = shown["aliases"].get("production") or {}
        if production.get("version") != latest:
            promoted = self.tenant.post(f"/v1/adapters/{adapter}/promote", json={"version": latest})
            assert promoted.status_code == 200, promoted.text


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


class Traffic:
    """Requests for one adapter, one after another in a thread, every answer counted."""

    def __init__(self, site: Site, model: str) -> None:
        self.site, self.model = site, model
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=180)

    def _run(self) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        }
        while not self._stop.is_set():
            try:
                answer = self.site.tenant.post("/v1/chat/completions", json=body)
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
                continue
            if answer.status_code == 200:
                self.ok += 1
            else:
                self.failures.append(f"{answer.status_code} {answer.text[:200]}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def site(fleet: Fleet) -> Site:
    return Site(fleet)


def _advance_until(site: Site, upgrade_id: str, done: Any, what: str) -> dict[str, Any]:
    """Advance the upgrade (as the workers' tick also does) until ``done(view)``."""
    deadline = time.monotonic() + WITHIN
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        answer = site.admin.post(f"/admin/bases/upgrades/{upgrade_id}/advance")
        assert answer.status_code == 200, answer.text
        view = answer.json()["upgrade"]
        if done(view):
            return view
        time.sleep(1.0)
    items = [(i["adapter"], i["state"], i["note"]) for i in view.get("items", [])]
    raise AssertionError(f"{what}: not reached within {WITHIN} s; items: {items}")


def _items(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["adapter"]: item for item in view["items"]}


def _three_adapters(site: Site, demo_base: Path, tmp_path: Path) -> None:
    """trained, noop (by jobs on OLD) and up (uploaded), each in production."""
    trained = site.train("trained", {"n_epochs": 3})
    noop = site.train("noop", {"n_epochs": 1, "learning_rate_multiplier": 1e-6})
    upload_and_promote(
        site.url, site.key, "up", random_adapter(demo_base, tmp_path / "up", 5), site.old
    )
    for job in (trained, noop):
        site.wait_job(job)
    for adapter in ("trained", "noop"):
        site.in_production(adapter)


def _start(site: Site) -> str:
    """The upgrade OLD -> NEW started (after its dry run's plan is checked); its id."""
    options = {"old_base": site.old, "new_base": site.new}
    plan = site.admin.post("/admin/bases/upgrades", json={**options, "dry_run": True}).json()
    kinds = {item["adapter"]: item["kind"] for item in plan["items"]}
    assert kinds == {"trained": "trained", "noop": "trained", "up": "uploaded"}
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=240)
    started = site.admin.post(
        "/admin/bases/upgrades",
        json={
            **options,
            "deadline": deadline.isoformat(),
            "uploaded_past_deadline": "retire",
            "canary_seconds": 2,
            "canary_weight": 0.2,
            "retire_grace_seconds": 1,
            "bar_margin": 0.05,
        },
    )
    assert started.status_code == 200, started.text
    upgrade_id: str = started.json()["id"]
    return upgrade_id


def _move(site: Site, upgrade_id: str) -> dict[str, Any]:
    """Advance it to the end, noop's owner choosing to retire it; the final view."""
    _advance_until(
        site, upgrade_id, lambda v: _items(v)["noop"]["state"] == "meets_bar", "noop meets the bar"
    )
    mine = site.tenant.get("/v1/upgrades").json()["data"]
    assert {i["adapter"] for u in mine for i in u["items"]} == {"trained", "noop", "up"}
    chosen = site.tenant.post(
        f"/v1/upgrades/{upgrade_id}/adapters/noop/choice", json={"choice": "retire"}
    )
    assert chosen.status_code == 200, chosen.text
    return _advance_until(site, upgrade_id, lambda v: v["state"] == "done", "the upgrade done")


def _states(site: Site, adapter: str) -> dict[int, str]:
    versions = site.tenant.get(f"/v1/adapters/{adapter}/versions").json()["data"]
    return {v["version"]: v["state"] for v in versions}


def test_an_upgrade_moves_retires_and_notifies_while_traffic_keeps_flowing(
    site: Site, demo_base: Path, tmp_path: Path
) -> None:
    _three_adapters(site, demo_base, tmp_path)
    receiver = Receiver()
    hook = site.tenant.post(
        "/v1/webhooks", json={"url": receiver.url, "events": ["adapter.upgrade.action_required"]}
    )
    assert hook.status_code in (200, 201), hook.text
    upgrade_id = _start(site)
    with Traffic(site, "trained") as traffic:
        view = _move(site, upgrade_id)
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.ok > 0

    items = _items(view)
    assert {name: item["state"] for name, item in items.items()} == {
        "trained": "migrated",
        "noop": "retired",
        "up": "retired",
    }, {name: item["note"] for name, item in items.items()}
    assert items["trained"]["new_version"] == 2
    assert view["report"]["left_on_old_base"] == []
    assert _states(site, "trained") == {1: "retired", 2: "active"}
    assert set(_states(site, "noop").values()) == set(_states(site, "up").values()) == {"retired"}
    answer = site.openai.chat.completions.with_raw_response.create(
        model="trained", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert answer.headers["x-loraplex-version"] == "2"  # served on the new base

    notified = [json.loads(body) for _, body, _ in receiver.received]
    told = [n for n in notified if n["type"] == "adapter.upgrade.action_required"]
    assert any(n["data"]["adapter"] == "up" for n in told), notified
    events = site.tenant.get("/v1/events", params={"limit": 1000}).json()["data"]
    types = {e["type"] for e in events}
    wanted = {"adapter.upgrade.retrained", "adapter.upgrade.promoted", "adapter.upgrade.retired"}
    assert wanted <= types
