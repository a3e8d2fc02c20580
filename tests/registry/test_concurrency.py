"""Many clients promoting and rolling back one adapter at once (each with its own
connection pool): aliases and the audit log must tell one consistent story."""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable
from pathlib import Path

from conftest import ADMIN
from registry_testdata import BASE_NAME
from sqlmodel import Session, func, select

from registry import BaseModelRecord, Conflict, Registry, Tenant
from registry.models import AliasHistory

CLIENTS = 16
STEPS = 6


def _client(registry: Registry, tenant_id: int, seed: int, errors: list[BaseException]) -> None:
    rng = random.Random(seed)
    try:
        for _ in range(STEPS):
            if rng.random() < 0.35:
                # Conflict: nothing to roll back to right now, a legitimate answer.
                with contextlib.suppress(Conflict):
                    registry.rollback(tenant_id, "bot", ADMIN)
            else:
                registry.promote(tenant_id, "bot", rng.randint(1, 3), ADMIN)
    except BaseException as exc:
        errors.append(exc)


def test_concurrent_promotes_and_rollbacks_stay_consistent(
    make_registry: Callable[..., Registry],
    registry: Registry,
    base: BaseModelRecord,
    tenant: Tenant,
    adapters: dict[str, Path],
) -> None:
    setup = registry
    assert tenant.id is not None
    for key in ("v1", "v2", "v3"):
        setup.push_adapter(tenant.id, "bot", adapters[key], BASE_NAME, ADMIN)
    clients = [make_registry() for _ in range(CLIENTS)]
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_client, args=(c, tenant.id, i, errors))
        for i, c in enumerate(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []

    events = [
        e
        for e in setup.audit_log(limit=10_000)
        if e.action in ("adapter.promote", "adapter.rollback")
    ]
    assert len(events) >= CLIENTS * STEPS * 0.5
    # Each change starts from exactly the state the previous change left.
    previous: object = {}
    for event in events:
        assert event.before is not None and event.after is not None
        assert event.before["aliases"] == previous
        previous = event.after["aliases"]
    final = setup.aliases(tenant.id, "bot")["production"].version
    assert previous == {"production": {"version": final, "weight": 1.0}}
    with Session(setup.database) as s:
        moves = s.exec(select(func.count()).select_from(AliasHistory)).one()
    assert moves == len(events)


def test_concurrent_first_pushes_create_one_adapter_and_one_version_per_content(
    make_registry: Callable[..., Registry],
    registry: Registry,
    base: BaseModelRecord,
    tenant: Tenant,
    adapters: dict[str, Path],
) -> None:
    setup = registry
    assert tenant.id is not None
    clients = [make_registry() for _ in range(8)]
    errors: list[BaseException] = []

    def push(client: Registry, key: str) -> None:
        try:
            client.push_adapter(tenant.id or 0, "bot", adapters[key], BASE_NAME, ADMIN)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=push, args=(c, ("v1", "v2")[i % 2])) for i, c in enumerate(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    versions = setup.list_versions(tenant.id, "bot")
    assert [v.number for v in versions] == [1, 2]
    assert len({v.fingerprint for v in versions}) == 2
    assert len(setup.audit_log(action="adapter.push")) == 2
