"""The event log and the webhook store (registry/events.py, registry/webhooks.py), on SQLite
and PostgreSQL: events read with a cursor, tenant-scoped; subscriptions and their secrets;
fan-out once per event; claims under a lease; backoff, dead-letter and redelivery."""

from __future__ import annotations

import base64
import datetime as dt
import threading
from pathlib import Path

import pytest
from conftest import ADMIN
from registry_testdata import BASE_NAME
from sqlmodel import Session

from registry import BaseModelRecord, InvalidRequest, NotFound, Registry, Tenant, audit
from registry.errors import Conflict
from registry.events import EventLog
from registry.jobs import FineTuningJob, JobStore, new_id
from registry.models import utcnow
from registry.webhooks import DEAD, DELIVERED, PENDING, Backoff, WebhookStore, signing_secrets

LEASE = dt.timedelta(seconds=30)
QUICK = Backoff(first=0.0, cap=0.0, max_attempts=3)


def _tenant_id(tenant: Tenant) -> int:
    assert tenant.id is not None
    return tenant.id


@pytest.fixture
def globex(registry: Registry) -> int:
    return _tenant_id(registry.create_tenant("globex", ADMIN))


def test_events_are_read_after_a_cursor_and_only_by_their_tenant(
    registry: Registry, base: BaseModelRecord, tenant: Tenant, globex: int,
    adapters: dict[str, Path],
) -> None:  # fmt: skip
    acme, log = _tenant_id(tenant), EventLog(registry)
    registry.push_adapter(acme, "bot", adapters["v1"], BASE_NAME, ADMIN)
    registry.promote(acme, "bot", 1, ADMIN)
    registry.create_api_key(acme, "tenant", ADMIN)  # an internal action: no event
    mine = log.read(acme)
    assert [e.type for e in mine] == [
        "base.registered", "adapter.version.created", "adapter.promoted"
    ]  # fmt: skip
    created = mine[1].to_json()
    assert created["object"] == "event" and created["tenant"] == "acme"
    assert (created["data"]["adapter"], created["data"]["version"]) == ("bot", 1)
    promoted = mine[2].data  # the version the alias points at now
    assert (promoted["version"], promoted["after"]["aliases"]["production"]["version"]) == (1, 1)
    assert mine[0].tenant is None and mine[0].data["base"].startswith(BASE_NAME)
    assert [e.id for e in log.read(acme, after=mine[1].id)] == [mine[2].id]
    assert [e.type for e in log.read(globex)] == ["base.registered"]  # never acme's
    assert [e.type for e in log.read(acme, types=["adapter.promoted"])] == ["adapter.promoted"]
    assert len(log.read(None)) == 3
    with pytest.raises(NotFound) as foreign:
        log.get(globex, mine[2].id)
    with pytest.raises(NotFound) as unknown:
        log.get(globex, 10**9)
    assert str(foreign.value) == f"event {mine[2].id} does not exist"
    assert str(unknown.value) == "event 1000000000 does not exist"
    with pytest.raises(InvalidRequest, match="unknown event type"):
        log.read(acme, types=["adapter.exploded"])


def test_job_ends_are_events(registry: Registry, base: BaseModelRecord, tenant: Tenant) -> None:
    acme, jobs = _tenant_id(tenant), JobStore(registry)
    file = jobs.create_file(acme, "train.jsonl", "fine-tune", b'{"prompt": "a"}\n')

    def submit() -> FineTuningJob:
        job = FineTuningJob(id=new_id("ftjob"), tenant_id=acme, model=base.name,
                            base_fingerprint=base.fingerprint, training_file=file.id,
                            adapter_name="bot")  # fmt: skip
        return jobs.create_job(job)

    cancelled, failed = submit(), submit()
    jobs.cancel(acme, cancelled.id)
    assert jobs.claim("w1", [base.fingerprint]) is not None
    assert jobs.fail(failed.id, "w1", "oom", "out of memory")
    events = [e for e in EventLog(registry).read(acme) if e.type.startswith("fine_tuning")]
    assert [(e.type, e.data["job"]) for e in events] == [
        ("fine_tuning.job.cancelled", cancelled.id), ("fine_tuning.job.failed", failed.id)
    ]  # fmt: skip
    assert events[1].data["after"]["error"]["code"] == "oom"


def test_a_subscription_has_a_secret_shown_once_and_limits(
    registry: Registry, tenant: Tenant, globex: int
) -> None:
    acme, store = _tenant_id(tenant), WebhookStore(registry, max_per_tenant=2)
    sub = store.create(acme, "https://hooks.example.com/a", ["adapter.promoted"])
    assert sub.secret.startswith("whsec_") and len(base64.b64decode(sub.secret[6:])) == 24
    assert [s.id for s in store.subscriptions(acme)] == [sub.id]
    assert store.subscriptions(globex) == []
    with pytest.raises(InvalidRequest, match="unknown event type"):
        store.create(acme, "https://hooks.example.com/b", ["adapter.bogus"])
    with pytest.raises(InvalidRequest, match="at most 2048"):
        store.create(acme, "https://hooks.example.com/" + "x" * 2048, [])
    store.create(acme, "https://hooks.example.com/b", [])
    with pytest.raises(Conflict, match="delete one first"):
        store.create(acme, "https://hooks.example.com/c", [])
    for act in (
        lambda i: store.get(globex, i),
        lambda i: store.delete(globex, i),
        lambda i: store.rotate(globex, i),
        lambda i: store.deliveries(globex, i),
    ):
        with pytest.raises(NotFound) as foreign:
            act(sub.id)
        with pytest.raises(NotFound) as unknown:
            act("wh_unknown")
        assert str(foreign.value) == str(unknown.value).replace("wh_unknown", sub.id)
    store.delete(acme, sub.id)
    with pytest.raises(NotFound):
        store.get(acme, sub.id)


def test_rotation_signs_with_both_secrets_until_the_grace_ends(
    registry: Registry, tenant: Tenant
) -> None:
    acme, store = _tenant_id(tenant), WebhookStore(registry)
    sub = store.create(acme, "https://hooks.example.com/a", [])
    rotated = store.rotate(acme, sub.id, grace=dt.timedelta(hours=1))
    assert rotated.secret != sub.secret
    assert signing_secrets(rotated) == [rotated.secret, sub.secret]
    later = utcnow() + dt.timedelta(hours=2)
    assert signing_secrets(rotated, later) == [rotated.secret]
    ended = store.rotate(acme, sub.id, grace=dt.timedelta(0))
    store.fan_out()  # drops the expired previous secret
    assert store.get(acme, sub.id).previous_secret is None
    assert signing_secrets(store.get(acme, sub.id)) == [ended.secret]
    with pytest.raises(InvalidRequest, match="grace period"):
        store.rotate(acme, sub.id, grace=dt.timedelta(days=8))


def test_events_fan_out_once_and_deliveries_are_claimed_under_a_lease(
    registry: Registry, base: BaseModelRecord, tenant: Tenant,
    globex: int, adapters: dict[str, Path],
) -> None:  # fmt: skip
    acme, store = _tenant_id(tenant), WebhookStore(registry)
    sub = store.create(acme, "https://hooks.example.com/a", ["adapter.promoted"])
    registry.push_adapter(acme, "bot", adapters["v1"], BASE_NAME, ADMIN)
    registry.promote(acme, "bot", 1, ADMIN)
    registry.push_adapter(globex, "bot", adapters["v2"], BASE_NAME, ADMIN)
    registry.promote(globex, "bot", 1, ADMIN)  # globex's: not acme's subscription's
    counts: list[int] = []
    racers = [threading.Thread(target=lambda: counts.append(WebhookStore(registry).fan_out()))
              for _ in range(3)]  # fmt: skip
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert sorted(counts) == [0, 0, 1] and store.fan_out() == 0
    (delivery,) = store.deliveries(acme, sub.id)
    assert delivery.state == PENDING and delivery.attempts == 0
    (claimed,) = store.claim("gw-a", LEASE)
    assert claimed.event.type == "adapter.promoted" and claimed.event.tenant == "acme"
    assert (claimed.delivery_id, claimed.url, claimed.attempt) == (delivery.id, sub.url, 1)
    assert store.claim("gw-b", LEASE) == []  # leased to gw-a
    assert store.finish(delivery.id, "gw-b", QUICK, 200) is None  # not gw-b's to finish
    assert store.finish(delivery.id, "gw-a", QUICK, 500, "HTTP 500") == PENDING
    (again,) = store.claim("gw-b", LEASE)  # backoff 0: due at once, to anyone
    assert again.attempt == 2
    assert store.finish(delivery.id, "gw-b", QUICK, 204) == DELIVERED
    assert store.claim("gw-a", LEASE) == []
    (done,) = store.deliveries(acme, sub.id)
    assert (done.state, done.attempts, done.last_status, done.last_error) == (
        DELIVERED, 2, 204, None
    )  # fmt: skip


def test_backoff_doubles_to_a_cap_then_dead_then_redelivered(
    registry: Registry, tenant: Tenant
) -> None:
    assert [Backoff(1.0, 5.0).delay(n).total_seconds() for n in (1, 2, 3, 4)] == [1, 2, 4, 5]
    acme, store = _tenant_id(tenant), WebhookStore(registry)
    sub = store.create(acme, "https://hooks.example.com/a", [])
    _event(registry, acme)
    store.fan_out()
    (first,) = store.claim("gw", LEASE)
    hourly = Backoff(first=3600.0, cap=3600.0)
    assert store.finish(first.delivery_id, "gw", hourly, None, "connection refused") == PENDING
    assert store.claim("gw", LEASE) == []  # due in an hour
    (row,) = store.deliveries(acme, sub.id)
    assert row.last_error == "connection refused" and row.state == PENDING
    with pytest.raises(Conflict, match="only dead ones"):
        store.redeliver(acme, sub.id, row.id)
    _event(registry, acme)
    store.fan_out()
    for attempt in (1, 2, 3):
        (claimed,) = store.claim("gw", LEASE)
        assert claimed.attempt == attempt
        state = store.finish(claimed.delivery_id, "gw", QUICK, 503)
        assert state == (DEAD if attempt == QUICK.max_attempts else PENDING)
    (dead,) = store.deliveries(acme, sub.id, state=DEAD)
    assert dead.attempts == 3 and dead.last_status == 503
    assert store.claim("gw", LEASE) == []
    assert store.redeliver(acme, sub.id, dead.id).state == PENDING
    assert [c.attempt for c in store.claim("gw", LEASE)] == [1]


def _event(registry: Registry, tenant_id: int) -> None:
    """One public event of ``tenant_id``'s (a drift alert, written as the gateways do)."""
    with Session(registry.database) as s, s.begin():
        audit.record(s, "test", "adapter.drift", "adapter:acme/bot", tenant_id=tenant_id)
