"""Base upgrades on SQLite and PostgreSQL: the plan (a dry run), the start, every item
transition (evaluate the new base alone, the owner's choice, retrain, compare, canary,
promote, retire; uploaded adapters past their deadline, retired or kept), cancelling,
resuming with a new store object, tenant isolation of the owner's choice, and the events.

Workers are played by the test: it finishes the jobs an upgrade queues as a worker would
(an evaluation-only job's result; a retraining job's version through ``JobStore.complete``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from registry import Actor, BaseModelRecord, Conflict, InvalidRequest, NotFound, Registry, Tenant
from registry.events import EventLog
from registry.models import utcnow
from registry.upgrades import UpgradeOptions, UpgradeStore
from tests.registry.registry_testdata import BASE_NAME, build_adapter, build_tiny_base
from tests.registry.upgrade_testdata import NEW_NAME, OPERATOR, WORKER, Fleet


@pytest.fixture(scope="session")
def new_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Other weights (three layers), the same module names and shapes.
    return build_tiny_base(tmp_path_factory.mktemp("new-base") / "tiny-llama-2", layers=3)


@pytest.fixture(scope="session")
def new_adapter(new_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_adapter(new_base_dir, tmp_path_factory.mktemp("new-adapter") / "a", seed=5)


@pytest.fixture
def fleet(
    registry: Registry, base: BaseModelRecord, tenant: Tenant, adapters: dict[str, Path]
) -> Fleet:
    other = registry.create_tenant("other", OPERATOR).id
    assert tenant.id is not None and other is not None
    return Fleet(registry, adapters, tenant.id, other)


@pytest.fixture
def new_base(registry: Registry, new_base_dir: Path) -> BaseModelRecord:
    return registry.register_base(new_base_dir, NEW_NAME, "r1", OPERATOR)


def _states(store: UpgradeStore, upgrade_id: str) -> dict[str, str]:
    return {item.adapter: item.state for item, _ in store.get(upgrade_id).items}


def _item(store: UpgradeStore, upgrade_id: str, adapter: str) -> Any:
    return next(item for item, _ in store.get(upgrade_id).items if item.adapter == adapter)


def _options(**changes: Any) -> UpgradeOptions:
    deadline = utcnow() + dt.timedelta(hours=1)
    values = {"deadline": deadline, "canary_seconds": 0, "retire_grace_seconds": 0}
    return UpgradeOptions(**{**values, **changes})


def test_the_plan_lists_every_served_adapter_and_writes_nothing(
    registry: Registry, fleet: Fleet, new_base: BaseModelRecord
) -> None:
    store = UpgradeStore(registry)
    plan = store.plan(BASE_NAME, NEW_NAME)
    rows = {(i.tenant, i.adapter): (i.kind, i.method, i.suites) for i in plan.items}
    assert rows == {
        ("acme", "bot"): ("trained", "supervised", ["fine-tune-test"]),
        ("acme", "easy"): ("trained", "supervised", ["fine-tune-test"]),
        ("acme", "up"): ("uploaded", None, []),
        ("other", "theirs"): ("uploaded", None, []),
    }
    assert next(i for i in plan.items if i.adapter == "bot").source.startswith("file file-")
    assert store.list_upgrades() == []
    with pytest.raises(InvalidRequest, match="the same base"):
        store.plan(BASE_NAME, BASE_NAME)


def test_an_upgrade_retrains_retires_and_ends_with_the_old_base_retired(
    registry: Registry, fleet: Fleet, new_base: BaseModelRecord, new_adapter: Path
) -> None:
    store = UpgradeStore(registry)
    options = _options(uploaded_past_deadline="retire")
    upgrade = store.start(BASE_NAME, NEW_NAME, options, OPERATOR)
    assert upgrade.row.id.startswith("upg_") and upgrade.row.state == "running"
    with pytest.raises(Conflict, match="is running"):
        store.start(BASE_NAME, NEW_NAME, options, OPERATOR)
    uid = upgrade.row.id
    store.advance(uid)
    assert _states(store, uid) == {
        "bot": "evaluating", "easy": "evaluating", "up": "awaiting", "theirs": "awaiting",
    }  # fmt: skip
    fleet.evaluated(_item(store, uid, "bot").eval_job, 0.2)  # misses the bar (0.8 - 0.05)
    fleet.evaluated(_item(store, uid, "easy").eval_job, 0.78)  # meets it
    moved = UpgradeStore(registry).advance(uid)  # a new store: as after a restart
    assert {(t.adapter, t.state) for t in moved} == {("bot", "retraining"), ("easy", "meets_bar")}
    assert "misses the bar" in _item(store, uid, "bot").note
    assert store.advance(uid) == []  # idempotent: nothing can move now
    # The owner's choice: another tenant's adapter is answered like one not in the upgrade.
    with pytest.raises(NotFound) as foreign:
        store.choose(fleet.other, uid, "easy", "retire", Actor("key:2"))
    with pytest.raises(NotFound) as unknown:
        store.choose(fleet.acme, uid, "nothing", "retire", Actor("key:1"))
    assert str(foreign.value) == str(unknown.value).replace("nothing", "easy")
    with pytest.raises(Conflict, match="meets_bar"):
        store.choose(fleet.acme, uid, "bot", "retire", Actor("key:1"))
    store.choose(fleet.acme, uid, "easy", "retire", Actor("key:1"))
    assert _states(store, uid)["easy"] == "retired"
    assert registry.get_version(fleet.acme, "easy", 1).state == "retired"
    # The retraining job's version is not promoted by the job: the upgrade moves traffic.
    model = fleet.retrained(_item(store, uid, "bot").retrain_job, 0.82, new_adapter)
    assert model == "bot@2" and registry.aliases(fleet.acme, "bot")["production"].version == 1
    moved = store.advance(uid)
    assert [t.state for t in moved if t.adapter == "bot"] == ["canary", "promoted", "migrated"]
    assert registry.aliases(fleet.acme, "bot")["production"].version == 2
    assert "canary" not in registry.aliases(fleet.acme, "bot")
    assert registry.get_version(fleet.acme, "bot", 1).state == "retired"
    # Uploaded adapters wait for their deadline, then are retired (the operator's option).
    assert store.get(uid).row.state == "running"
    moved = store.advance(uid, now=utcnow() + dt.timedelta(hours=2))
    assert sorted((str(t.adapter), t.state) for t in moved) == [
        ("None", "done"), ("theirs", "retired"), ("up", "retired"),
    ]  # fmt: skip
    assert moved[-1].state == "done"
    done = store.get(uid)
    assert done.row.state == "done" and done.row.report is not None
    assert done.row.report["left_on_old_base"] == []
    assert done.row.report["items"] == {
        "migrated": ["acme/bot"], "retired": ["acme/easy", "acme/up", "other/theirs"],
    }  # fmt: skip
    _events_say_so(registry, fleet)


def _events_say_so(registry: Registry, fleet: Fleet) -> None:
    events = EventLog(registry).read(fleet.acme, limit=1000)
    types = [e.type for e in events]
    assert "base.upgrade.started" in types and "base.upgrade.completed" in types
    completed = next(e for e in events if e.type == "base.upgrade.completed")
    assert completed.tenant is None and completed.data["after"]["items"] == {
        "migrated": 1, "retired": 3,
    }  # fmt: skip
    for kind in ("action_required", "retrained", "promoted", "retired", "chosen"):
        assert f"adapter.upgrade.{kind}" in types, kind
    asked = next(
        e
        for e in events
        if e.type == "adapter.upgrade.action_required" and e.data["adapter"] == "up"
    )
    assert asked.data["version"] == 1 and asked.data["after"]["deadline"]
    assert asked.tenant == "acme"
    # The other tenant's log holds its own adapter's events, never acme's.
    theirs = EventLog(registry).read(fleet.other, limit=1000)
    assert {e.data.get("adapter") for e in theirs if e.type.startswith("adapter.")} == {"theirs"}


def test_uploaded_adapters_can_be_kept_and_unanswered_choices_retrain(
    registry: Registry, fleet: Fleet, new_base: BaseModelRecord
) -> None:
    store = UpgradeStore(registry)
    uid = store.start(BASE_NAME, NEW_NAME, _options(), OPERATOR).row.id
    store.advance(uid)
    fleet.evaluated(_item(store, uid, "bot").eval_job, 0.9)
    fleet.evaluated(_item(store, uid, "easy").eval_job, 0.9)
    store.advance(uid)
    assert _states(store, uid)["bot"] == "meets_bar"
    later = utcnow() + dt.timedelta(hours=2)
    store.advance(uid, now=later)
    states = _states(store, uid)
    assert (states["up"], states["bot"], states["easy"]) == ("kept", "retraining", "retraining")
    assert registry.get_version(fleet.acme, "up", 1).state == "active"
    assert registry.aliases(fleet.acme, "up")["production"].version == 1


def test_a_failed_retraining_or_gate_fails_the_item_and_keeps_production(
    registry: Registry, fleet: Fleet, new_base: BaseModelRecord, new_adapter: Path
) -> None:
    from registry.gates import Gate

    registry.set_gates(fleet.acme, "bot", [Gate("fine-tune-test", "exact_match", 0.9)], OPERATOR)
    store = UpgradeStore(registry)
    uid = store.start(BASE_NAME, NEW_NAME, _options(), OPERATOR).row.id
    store.advance(uid)
    fleet.evaluated(_item(store, uid, "bot").eval_job, 0.1)
    fleet.evaluated(_item(store, uid, "easy").eval_job, 0.1)
    store.advance(uid)
    fleet.retrained(_item(store, uid, "bot").retrain_job, 0.85, new_adapter)  # gate: 0.9
    easy = fleet.jobs.get_job(None, _item(store, uid, "easy").retrain_job)
    fleet.hold(easy.id)
    fleet.jobs.fail(easy.id, WORKER, "training_error", "out of memory")
    store.advance(uid)
    bot, failed_easy = _item(store, uid, "bot"), _item(store, uid, "easy")
    assert bot.state == "failed" and "misses the minimum 0.9" in bot.note
    assert failed_easy.state == "failed" and "out of memory" in failed_easy.note
    assert registry.aliases(fleet.acme, "bot")["production"].version == 1


def test_cancel_stops_the_items_and_their_jobs(
    registry: Registry, fleet: Fleet, new_base: BaseModelRecord
) -> None:
    store = UpgradeStore(registry)
    uid = store.start(BASE_NAME, NEW_NAME, _options(), OPERATOR).row.id
    store.advance(uid)
    job_id = _item(store, uid, "bot").eval_job
    cancelled = store.cancel(uid, OPERATOR)
    assert cancelled.row.state == "cancelled"
    assert set(_states(store, uid).values()) == {"cancelled"}
    assert fleet.jobs.get_job(None, job_id).status == "cancelled"
    assert store.advance(uid) == []
    with pytest.raises(Conflict, match="only running ones"):
        store.cancel(uid, OPERATOR)
    # A new upgrade of the same base may start once the last one ended.
    assert store.start(BASE_NAME, NEW_NAME, _options(), OPERATOR).row.state == "running"


def test_options_are_checked_all_at_once(
    registry: Registry, fleet: Fleet, new_base: BaseModelRecord
) -> None:
    bad = UpgradeOptions(
        deadline=dt.datetime(2030, 1, 1), uploaded_past_deadline="delete",
        canary_weight=2.0, canary_seconds=-1, bar_margin=float("nan"),
    )  # fmt: skip
    assert len(bad.problems()) == 5
    assert len(dataclasses.replace(bad, retire_grace_seconds=-1).problems()) == 6
    with pytest.raises(InvalidRequest, match="canary_weight"):
        UpgradeStore(registry).start(BASE_NAME, NEW_NAME, bad, OPERATOR)
    past = UpgradeOptions(deadline=utcnow() - dt.timedelta(seconds=1))
    with pytest.raises(InvalidRequest, match="in the future"):
        UpgradeStore(registry).start(BASE_NAME, NEW_NAME, past, OPERATOR)
    with pytest.raises(NotFound):
        UpgradeStore(registry).get("upg_nothing")


def test_a_canary_failing_more_than_production_is_rolled_back(
    registry: Registry, fleet: Fleet, new_base: BaseModelRecord, new_adapter: Path
) -> None:
    store = UpgradeStore(registry)
    uid = store.start(BASE_NAME, NEW_NAME, _options(canary_seconds=60), OPERATOR).row.id
    store.advance(uid)
    fleet.evaluated(_item(store, uid, "bot").eval_job, 0.1)
    fleet.evaluated(_item(store, uid, "easy").eval_job, 0.1)
    store.advance(uid)
    fleet.retrained(_item(store, uid, "bot").retrain_job, 0.85, new_adapter)
    store.advance(uid)
    assert _item(store, uid, "bot").state == "canary"
    assert registry.aliases(fleet.acme, "bot")["canary"].version == 2
    assert store.advance(uid) == []  # the canary runs for its 60 s first
    registry.record_usage(fleet.acme, "bot", 2, requests=10, errors=3)
    registry.record_usage(fleet.acme, "bot", 1, requests=90, errors=0)
    moved = store.advance(uid, now=utcnow() + dt.timedelta(seconds=61))
    assert [(t.adapter, t.state) for t in moved] == [("bot", "failed")]
    assert "canary error rate 30.00% is worse than production's 0.00%" in moved[0].message
    aliases = registry.aliases(fleet.acme, "bot")
    assert "canary" not in aliases and aliases["production"].version == 1
    assert registry.get_version(fleet.acme, "bot", 1).state == "active"


def test_an_uploaded_adapter_its_owner_moves_is_migrated_before_the_deadline(
    registry: Registry, fleet: Fleet, new_base: BaseModelRecord, new_adapter: Path
) -> None:
    store = UpgradeStore(registry)
    uid = store.start(BASE_NAME, NEW_NAME, _options(), OPERATOR).row.id
    store.advance(uid)
    assert _item(store, uid, "up").state == "awaiting"
    registry.push_adapter(fleet.acme, "up", new_adapter, NEW_NAME, OPERATOR)
    registry.promote(fleet.acme, "up", 2, OPERATOR)
    moved = store.advance(uid)
    assert [(t.adapter, t.state) for t in moved] == [("up", "migrated")]
    assert registry.get_version(fleet.acme, "up", 1).state == "retired"
    assert _item(store, uid, "up").new_version == 2
