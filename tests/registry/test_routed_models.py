"""Routed models in the registry (registry/routed_models.py) on SQLite and PostgreSQL:
versions and the first one live, reference checks, name clashes both ways, gates on
routing evals, promote and rollback, delete and reuse, audit and lifecycle events, and
tenant isolation (a foreign routed model or adapter answers like an unknown one)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from registry_testdata import BASE_NAME
from sqlmodel import Session, SQLModel, func, select

from registry import (
    ROUTING_SUITE,
    Actor,
    AdapterVersion,
    AuditEvent,
    Conflict,
    GateFailed,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Registry,
    RoutedModelStore,
    RoutingGate,
    Tenant,
)
from registry.events import EventLog
from registry.routed_models import (
    MAX_POLICY_BYTES,
    RoutedModel,
    RoutedModelEval,
    RoutedModelHistory,
    RoutedModelVersion,
)
from registry.webhooks import WebhookStore

USER = Actor("key:7")
NAME = "support-suite"
POLICY: dict[str, Any] = {"rules": [{"if": "refund", "then": "bot"}], "default": BASE_NAME}
REFS = ["bot", BASE_NAME]
TABLES: list[type[SQLModel]] = [
    RoutedModel,
    RoutedModelVersion,
    RoutedModelEval,
    RoutedModelHistory,
    AuditEvent,
]


@pytest.fixture
def store(registry: Registry) -> RoutedModelStore:
    return RoutedModelStore(registry)


@pytest.fixture
def acme(tenant: Tenant, bot_v1: AdapterVersion) -> int:
    """Tenant acme's id; acme owns adapter ``bot`` (version 1) on the registered base."""
    assert tenant.id is not None
    return tenant.id


@pytest.fixture
def globex(registry: Registry, acme: int, adapters: dict[str, Path]) -> int:
    """Another tenant, owning adapter ``helper``."""
    other = registry.create_tenant("globex", USER)
    assert other.id is not None
    registry.push_adapter(other.id, "helper", adapters["v2"], BASE_NAME, USER)
    return other.id


def _rows(registry: Registry) -> dict[str, int]:
    with Session(registry.database) as s:
        return {t.__name__: s.exec(select(func.count()).select_from(t)).one() for t in TABLES}


def _unchanged(registry: Registry, attempt: Callable[[], object], error: type[Exception]) -> str:
    """Run a refused ``attempt``: it raises ``error`` and writes no row; its message."""
    before = _rows(registry)
    with pytest.raises(error) as caught:
        attempt()
    if error is GateFailed:  # recorded, alone: a refusal by the gates is a public event
        before = {**before, "AuditEvent": before["AuditEvent"] + 1}
    assert _rows(registry) == before
    return str(caught.value)


def test_versions_are_numbered_and_only_the_first_goes_live_at_once(
    store: RoutedModelStore, acme: int
) -> None:
    first = store.save_version(acme, NAME, POLICY, REFS, USER, description="v1")
    assert (first.number, first.live, first.references) == (1, True, REFS)
    assert store.live(acme, NAME) == store.live(acme, NAME)
    live = store.live(acme, NAME)
    assert live is not None and (live.version, live.policy) == (1, POLICY)
    second = store.save_version(acme, NAME, {"default": "bot"}, ["bot", "bot"], USER)
    assert (second.number, second.live, second.references) == (2, False, ["bot"])
    info = store.get(acme, NAME)
    assert (info.live_version, info.latest_version, info.versions) == (1, 2, 2)
    assert [v.number for v in store.versions(acme, NAME)] == [1, 2]
    assert store.version(acme, NAME, 2).policy == {"default": "bot"}
    assert [i.name for i in store.list(acme)] == [NAME]
    assert info.to_json()["live_version"] == 1 and second.to_json()["live"] is False
    with pytest.raises(NotFound, match="has no version 3"):
        store.version(acme, NAME, 3)


def test_concurrent_saves_of_a_new_routed_model_get_distinct_numbers(
    store: RoutedModelStore, acme: int
) -> None:
    saved: list[tuple[int, bool]] = []

    def writer() -> None:
        for _ in range(3):
            version = store.save_version(acme, NAME, POLICY, REFS, USER)
            saved.append((version.number, version.live))

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(saved) == [(1, True)] + [(n, False) for n in range(2, 13)]
    assert [i.versions for i in store.list(acme)] == [12]


def test_references_are_own_adapters_and_bases_never_foreign_or_routed(
    registry: Registry, store: RoutedModelStore, acme: int, globex: int
) -> None:
    assert store.save_version(acme, NAME, POLICY, ["bot@1", "bot:canary", BASE_NAME], USER)
    foreign = _unchanged(
        registry, lambda: store.save_version(acme, "x", POLICY, ["helper"], USER), InvalidRequest
    )
    unknown = _unchanged(
        registry, lambda: store.save_version(acme, "x", POLICY, ["nobody"], USER), InvalidRequest
    )
    assert foreign == unknown.replace("'nobody'", "'helper'")
    assert "no registered base and none of your adapters" in unknown
    routed = _unchanged(
        registry, lambda: store.save_version(acme, "x", POLICY, [NAME], USER), InvalidRequest
    )
    assert "cannot route to another one" in routed
    for refs in ([], ["bot@9"], [f"{NAME}@1"], ["a\x00b"]):
        _unchanged(
            registry, partial(store.save_version, acme, "x", POLICY, refs, USER), InvalidRequest
        )


def test_names_clash_neither_with_adapters_and_bases_nor_the_other_way(
    registry: Registry, store: RoutedModelStore, acme: int, globex: int, adapters: dict[str, Path]
) -> None:
    for name in ("bot", BASE_NAME):
        message = _unchanged(
            registry, partial(store.save_version, acme, name, POLICY, REFS, USER), Conflict
        )
        assert "pick another name for the routed model" in message
    for name in ("lx-0011", "-bad", "a" * 65):
        _unchanged(
            registry, partial(store.save_version, acme, name, POLICY, REFS, USER), InvalidRequest
        )
    # Another tenant's adapter name is free here: names are per tenant.
    store.save_version(globex, "bot", POLICY, ["helper"], USER)
    store.save_version(acme, NAME, POLICY, REFS, USER)
    with pytest.raises(Conflict, match="one of your routed models"):
        registry.push_adapter(acme, NAME, adapters["v3"], BASE_NAME, USER)
    assert registry.get_adapter(acme, NAME) is None
    registry.push_adapter(globex, NAME, adapters["v3"], BASE_NAME, USER)  # globex's own name


def test_a_policy_over_the_size_limit_is_refused_precisely(
    registry: Registry, store: RoutedModelStore, acme: int
) -> None:
    big = {"rules": ["x" * MAX_POLICY_BYTES]}
    message = _unchanged(
        registry, lambda: store.save_version(acme, NAME, big, REFS, USER), InvalidRequest
    )
    assert f"over the limit of {MAX_POLICY_BYTES} bytes (64 KiB)" in message
    assert "policy is 65550 bytes" in message
    _unchanged(
        registry,
        lambda: store.save_version(acme, NAME, {"x": float("nan")}, REFS, USER),
        InvalidRequest,
    )


def test_a_foreign_routed_model_answers_like_an_unknown_one(
    registry: Registry, store: RoutedModelStore, acme: int, globex: int
) -> None:
    store.save_version(acme, NAME, POLICY, REFS, USER)
    calls: list[Callable[[int, str], object]] = [
        store.get,
        store.versions,
        store.evals,
        lambda t, n: store.version(t, n, 1),
        lambda t, n: store.promote(t, n, 1, USER),
        lambda t, n: store.rollback(t, n, USER),
        lambda t, n: store.delete(t, n, USER),
        lambda t, n: store.set_gates(t, n, [RoutingGate(min_accuracy=0.5)], USER),
        lambda t, n: store.record_eval(t, n, 1, 0.9, 10, {}, USER),
    ]
    for call in calls:
        foreign = _unchanged(registry, partial(call, globex, NAME), NotFound)
        unknown = _unchanged(registry, partial(call, globex, "nothing-here"), NotFound)
        assert foreign == unknown.replace("'nothing-here'", repr(NAME))
    assert store.live(globex, NAME) is None and store.list(globex) == []
    assert store.live(acme, NAME) is not None


def _evaluated(store: RoutedModelStore, acme: int, accuracies: list[float]) -> None:
    """Versions 1..n of the routed model, version i with one eval of accuracies[i-1]."""
    for number, accuracy in enumerate(accuracies, start=1):
        store.save_version(acme, NAME, POLICY, REFS, USER)
        confusion = {"bot": {"bot": round(accuracy * 100), BASE_NAME: 100 - round(accuracy * 100)}}
        store.record_eval(acme, NAME, number, accuracy, 100, confusion, USER)


def test_gates_check_the_minimum_the_regression_and_a_missing_eval(
    registry: Registry, store: RoutedModelStore, acme: int
) -> None:
    _evaluated(store, acme, [0.80, 0.72, 0.75])
    store.save_version(acme, NAME, POLICY, REFS, USER)  # version 4: no eval
    gates = [RoutingGate(min_accuracy=0.74, max_regression=0.05), RoutingGate(suite="hard")]
    assert store.set_gates(acme, NAME, gates, USER) == gates
    assert store.get(acme, NAME).gates == gates
    failed = _unchanged(registry, lambda: store.promote(acme, NAME, 2, USER), GateFailed)
    assert "routing: accuracy 0.72 misses the minimum 0.74" in failed
    assert "routing: accuracy 0.72 is below live version 1's 0.8 by more than" in failed
    assert "hard: version 2 has no routing eval on suite 'hard'; record a routing eval" in failed
    missing = _unchanged(registry, lambda: store.promote(acme, NAME, 4, USER), GateFailed)
    assert "routing: version 4 has no routing eval" in missing
    store.record_eval(acme, NAME, 3, 1.0, 5, {}, USER, suite="hard")
    promoted = store.promote(acme, NAME, 3, USER)  # 0.75 is 0.05 below 0.80: at the tolerance
    assert promoted.live and store.live(acme, NAME) is not None
    assert [e.number for e in store.evals(acme, NAME)] == [1, 2, 3, 3]
    with pytest.raises(Conflict, match="already live"):
        store.promote(acme, NAME, 3, USER)
    with pytest.raises(PermissionDenied):
        store.promote(acme, NAME, 2, USER, override=True)
    store.promote(acme, NAME, 2, Actor("admin", admin=True), override=True)
    after = registry.audit_log(tenant_id=acme, action="routed_model.promote")[-1].after
    assert after is not None and after["override"] is True and after["failed_gates"]


def test_a_regression_gate_passes_with_a_note_when_the_live_version_has_no_eval(
    registry: Registry, store: RoutedModelStore, acme: int
) -> None:
    store.save_version(acme, NAME, POLICY, REFS, USER)
    store.save_version(acme, NAME, POLICY, REFS, USER)
    store.record_eval(acme, NAME, 2, 0.5, 10, {}, USER)
    store.set_gates(acme, NAME, [RoutingGate(max_regression=0.0)], USER)
    store.promote(acme, NAME, 2, USER)
    after = registry.audit_log(tenant_id=acme, action="routed_model.promote")[-1].after
    assert after is not None and "max_regression not checked" in after["gate_notes"][0]


def test_gates_and_evals_refuse_values_that_cannot_be_right(
    registry: Registry, store: RoutedModelStore, acme: int
) -> None:
    bad: list[Callable[[], RoutingGate]] = [
        partial(RoutingGate, min_accuracy=1.5),
        partial(RoutingGate, max_regression=-0.1),
        partial(RoutingGate, min_accuracy=float("nan")),
        partial(RoutingGate, suite=""),
    ]
    for make in bad:
        with pytest.raises(InvalidRequest):
            make()
    store.save_version(acme, NAME, POLICY, REFS, USER)
    twice = [RoutingGate(min_accuracy=0.5), RoutingGate(ROUTING_SUITE, max_regression=0.1)]
    _unchanged(registry, lambda: store.set_gates(acme, NAME, twice, USER), InvalidRequest)
    for accuracy, examples, confusion in (
        (1.2, 10, {}),
        (0.5, 0, {}),
        (0.5, 10, {"bot": {"bot": 11}}),
        (0.5, 10, {"bot": {"bot": -1}}),
    ):
        record = partial(store.record_eval, acme, NAME, 1, accuracy, examples, confusion, USER)
        _unchanged(registry, record, InvalidRequest)
    _unchanged(registry, lambda: store.record_eval(acme, NAME, 2, 0.5, 1, {}, USER), NotFound)
    recorded = store.record_eval(acme, NAME, 1, 0.5, 10, {"bot": {"bot": 5, "x": 5}}, USER)
    assert recorded.to_json()["confusion"] == {"bot": {"bot": 5, "x": 5}}


def test_rollback_walks_the_promotes_back_and_then_refuses(
    registry: Registry, store: RoutedModelStore, acme: int
) -> None:
    for _ in range(3):
        store.save_version(acme, NAME, POLICY, REFS, USER)
    message = _unchanged(registry, lambda: store.rollback(acme, NAME, USER), Conflict)
    assert "no earlier live version" in message
    store.promote(acme, NAME, 2, USER)
    store.promote(acme, NAME, 3, USER)
    assert store.rollback(acme, NAME, USER).number == 2
    assert store.rollback(acme, NAME, USER).number == 1
    live = store.live(acme, NAME)
    assert live is not None and live.version == 1
    _unchanged(registry, lambda: store.rollback(acme, NAME, USER), Conflict)


def test_delete_frees_the_name_and_keeps_the_history(
    registry: Registry, store: RoutedModelStore, acme: int, adapters: dict[str, Path]
) -> None:
    store.save_version(acme, NAME, POLICY, REFS, USER)
    store.record_eval(acme, NAME, 1, 0.9, 10, {}, USER)
    store.delete(acme, NAME, USER)
    assert store.live(acme, NAME) is None and store.list(acme) == []
    with pytest.raises(NotFound):
        store.get(acme, NAME)
    with pytest.raises(NotFound):
        store.delete(acme, NAME, USER)
    again = store.save_version(acme, NAME, {"default": "bot"}, ["bot"], USER)
    assert (again.number, again.live) == (1, True) and store.evals(acme, NAME) == []
    store.delete(acme, NAME, USER)
    registry.push_adapter(acme, NAME, adapters["v3"], BASE_NAME, USER)  # the name is free
    with Session(registry.database) as s:
        assert s.exec(select(func.count()).select_from(RoutedModelVersion)).one() == 2
        assert s.exec(select(func.count()).select_from(RoutedModelEval)).one() == 1


def test_every_write_is_audited_and_public_ones_are_events(
    registry: Registry, store: RoutedModelStore, acme: int
) -> None:
    store.save_version(acme, NAME, POLICY, REFS, USER)
    store.save_version(acme, NAME, POLICY, REFS, USER)
    store.set_gates(acme, NAME, [], USER)
    store.record_eval(acme, NAME, 2, 0.9, 10, {}, USER)
    store.promote(acme, NAME, 2, USER)
    store.rollback(acme, NAME, USER)
    store.delete(acme, NAME, USER)
    rows = registry.audit_log(tenant_id=acme, subject_prefix="routed_model:")
    assert [r.action.removeprefix("routed_model.") for r in rows] == [
        "save", "save", "gates", "eval", "promote", "rollback", "delete"
    ]  # fmt: skip
    assert rows[0].subject == f"routed_model:acme/{NAME}@1" and rows[0].actor == USER.name
    events = EventLog(registry).read(acme, types=["routed_model.promoted", "routed_model.deleted"])
    assert [(e.type, e.data["routed_model"], e.data.get("version")) for e in events] == [
        ("routed_model.promoted", NAME, 2),
        ("routed_model.deleted", NAME, None),
    ]
    created = EventLog(registry).read(acme, types=["routed_model.version.created"])
    assert [e.data["version"] for e in created] == [1, 2]
    WebhookStore(registry).create(acme, "https://example.com/hook", ["routed_model.rolled_back"])
