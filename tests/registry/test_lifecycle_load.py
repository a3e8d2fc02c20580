"""1,000 promote, rollback and canary operations from many concurrent REST clients on PostgreSQL.

A real `loraplex serve` (no engine: lifecycle calls need none) on a fresh
PostgreSQL database takes the operations through its tenant API. Every answer
must be a success or a clean refusal (409), never a server error; afterwards
the audit log, replayed event by event, must arrive exactly at the aliases the
registry holds, with one audit event and one alias-history row per success and
none per refusal: each operation wholly applied or wholly refused.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session, func, select

from registry import ADMIN_SCOPE, TENANT_SCOPE, Actor, LocalBlobStore, Registry
from registry.models import AliasHistory
from tests import reliability
from tests.e2e.serving import ServeProcess, free_port
from tests.registry.registry_testdata import (
    BASE_NAME,
    BASE_REVISION,
    create_database,
    drop_database,
)

OPERATOR = Actor("test:operator", admin=True)
OPERATIONS = 1000
CLIENTS = 32
ADAPTERS = ("bot", "helper")
ALIAS_ACTIONS = ("adapter.promote", "adapter.rollback", "adapter.canary", "adapter.canary_clear")


@dataclass(frozen=True)
class Outcome:
    adapter: str
    op: str
    status: int


@dataclass
class Setup:
    gateway: ServeProcess
    registry: Registry
    tenant_id: int
    tenant_key: str
    admin_key: str


@pytest.fixture
def lifecycle_gateway(
    tiny_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> Iterator[Setup]:
    url = create_database("loraplex_lifecycle_load")
    blobs = tmp_path / "blobs"
    registry = Registry(url, LocalBlobStore(blobs))
    gateway: ServeProcess | None = None
    try:
        registry.register_base(tiny_base, BASE_NAME, BASE_REVISION, OPERATOR)
        tenant = registry.create_tenant("acme", OPERATOR)
        assert tenant.id is not None
        _, tenant_key = registry.create_api_key(tenant.id, TENANT_SCOPE, OPERATOR)
        _, admin_key = registry.create_api_key(None, ADMIN_SCOPE, OPERATOR)
        for name in ADAPTERS:
            for key in ("v1", "v2", "v3"):
                registry.push_adapter(tenant.id, name, adapters[key], BASE_NAME, OPERATOR)
        gateway = ServeProcess(
            tmp_path / "serve",
            args=[
                "--base-model",
                str(tiny_base),
                "--served-model-name",
                BASE_NAME,
                "--base-revision",
                BASE_REVISION,
                # Nothing listens there: lifecycle calls need no engine, and pre-warm skips it.
                "--engine-urls",
                f"http://127.0.0.1:{free_port()}",
            ],
            env={"LORAPLEX_DATABASE_URL": url, "LORAPLEX_BLOB_URL": str(blobs)},
        ).start()
        _wait_up(gateway)
        yield Setup(gateway, registry, tenant.id, tenant_key, admin_key)
    finally:
        if gateway is not None:
            assert gateway.stop(), gateway.log_tail()
        registry.close()
        drop_database(url)


def _wait_up(gateway: ServeProcess, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert gateway.process is not None
        if gateway.process.poll() is not None:
            raise AssertionError(f"loraplex serve exited:\n{gateway.log_tail()}")
        try:
            if httpx.get(gateway.url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"loraplex serve did not come up:\n{gateway.log_tail()}")


def _one_operation(http: httpx.Client, rng: random.Random) -> Outcome:
    """A random lifecycle call on a random adapter; its HTTP status."""
    name = rng.choice(ADAPTERS)
    roll = rng.random()
    if roll < 0.45:
        op, response = (
            "promote",
            http.post(f"/v1/adapters/{name}/promote", json={"version": rng.randint(1, 3)}),
        )
    elif roll < 0.7:
        op, response = "rollback", http.post(f"/v1/adapters/{name}/rollback")
    elif roll < 0.9:
        body = {"version": rng.randint(1, 3), "weight": round(rng.uniform(0.05, 0.5), 2)}
        op, response = "canary", http.post(f"/v1/adapters/{name}/canary", json=body)
    else:
        op, response = "clear_canary", http.delete(f"/v1/adapters/{name}/canary")
    if response.status_code >= 400:
        # Refusals must be OpenAI-shaped too.
        error = response.json()["error"]
        assert {"message", "type", "param", "code"} <= set(error), response.text
    return Outcome(name, op, response.status_code)


def _run_clients(setup: Setup) -> list[Outcome]:
    outcomes: list[Outcome] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    shares = [OPERATIONS // CLIENTS + (i < OPERATIONS % CLIENTS) for i in range(CLIENTS)]

    def client(seed: int, count: int) -> None:
        rng = random.Random(seed)
        headers = {"authorization": f"Bearer {setup.tenant_key}"}
        try:
            with httpx.Client(base_url=setup.gateway.url, headers=headers, timeout=60) as http:
                for _ in range(count):
                    outcome = _one_operation(http, rng)
                    with lock:
                        outcomes.append(outcome)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i, n)) for i, n in enumerate(shares)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [], errors[:3]
    return outcomes


def _audit(setup: Setup) -> list[dict[str, Any]]:
    response = httpx.get(
        setup.gateway.url + "/admin/audit",
        params={"tenant": "acme", "limit": 100_000},
        headers={"authorization": f"Bearer {setup.admin_key}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return [e for e in response.json()["data"] if e["action"] in ALIAS_ACTIONS]


def _replay_breaks(events: list[dict[str, Any]], adapter: str) -> tuple[int, object]:
    """Events whose ``before`` is not the state the previous event left; the final state."""
    state: object = {}
    breaks = 0
    for event in events:
        if event["before"]["aliases"] != state:
            breaks += 1
        state = event["after"]["aliases"]
    return breaks, state


def _current_aliases(setup: Setup, adapter: str) -> dict[str, Any]:
    held = setup.registry.aliases(setup.tenant_id, adapter)
    return {
        name: {"version": target.version, "weight": target.weight}
        for name, target in sorted(held.items())
    }


@pytest.mark.reliability
def test_a_thousand_concurrent_lifecycle_operations_agree_with_the_audit_log(
    lifecycle_gateway: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = lifecycle_gateway
    outcomes = _run_clients(setup)
    events = _audit(setup)

    statuses = Counter(o.status for o in outcomes)
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    unexpected = sum(n for status, n in statuses.items() if status not in (200, 204, 409))
    applied = Counter(o.adapter for o in outcomes if o.status in (200, 204))
    inconsistent = 0
    for adapter in ADAPTERS:
        mine = [e for e in events if e["subject"].endswith(f"/{adapter}")]
        breaks, replayed = _replay_breaks(mine, adapter)
        inconsistent += breaks
        inconsistent += abs(len(mine) - applied[adapter])  # applied without record, or vice versa
        inconsistent += replayed != _current_aliases(setup, adapter)
    with Session(setup.registry.database) as s:
        history_rows = s.exec(select(func.count()).select_from(AliasHistory)).one()
    inconsistent += abs(history_rows - len(events))

    reliability.record(
        "load",
        "1,000 concurrent promote/rollback/canary ops (32 REST clients, PostgreSQL)",
        len(outcomes),
        "ops",
        server_errors + unexpected + inconsistent,
        "server errors or ops not wholly applied/refused",
    )
    with capsys.disabled():
        print(f"\n[lifecycle load] {len(outcomes)} ops: {dict(statuses)}; {len(events)} events")
    assert len(outcomes) == OPERATIONS
    assert server_errors == 0 and unexpected == 0, statuses
    # Both outcomes happened: the mix really exercised applying and refusing.
    assert statuses[200] > 100 and statuses[409] > 10, statuses
    assert inconsistent == 0
