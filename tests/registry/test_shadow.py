"""Shadow traffic in the registry (registry/shadow.py, lifecycle.shadow) on SQLite and
PostgreSQL: the alias and its refusals, sums added by concurrent gateways, the comparison
rules, the results recorded as suite ``shadow`` that gates use, and tenant isolation."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from registry_testdata import BASE_NAME

from registry import (
    Actor,
    AdapterVersion,
    Conflict,
    Gate,
    GateFailed,
    InvalidRequest,
    NotFound,
    Registry,
    Tenant,
)
from registry.shadow import ShadowBatch, ShadowStore, agrees, json_check

USER = Actor("key:7")
INTENT = '{"intent": "refund"}'


@pytest.fixture
def bot_v2(
    registry: Registry, tenant: Tenant, bot_v1: AdapterVersion, adapters: dict[str, Path]
) -> AdapterVersion:
    """``bot`` with version 1 in production and version 2 pushed."""
    assert tenant.id is not None
    registry.promote(tenant.id, "bot", 1, USER)
    return registry.push_adapter(tenant.id, "bot", adapters["v2"], BASE_NAME, USER)


def _batch(tenant: Tenant, pairs: list[tuple[str, str]], **counts: int) -> ShadowBatch:
    assert tenant.id is not None
    batch = ShadowBatch(tenant.id, "bot", candidate=2, production=1, **counts)
    batch.pairs = [([p], [c]) for p, c in pairs]
    return batch


def test_the_shadow_alias_is_set_shown_and_cleared_with_history(
    registry: Registry, tenant: Tenant, bot_v2: AdapterVersion
) -> None:
    assert tenant.id is not None
    store = ShadowStore(registry)
    assert store.status(tenant.id, "bot").version is None
    registry.set_shadow(tenant.id, "bot", 2, 0.25, USER)
    status = store.status(tenant.id, "bot")
    assert (status.version, status.share, status.production) == (2, 0.25, 1)
    assert status.to_json()["results"]["agreement"] is None
    registry.clear_shadow(tenant.id, "bot", USER)
    assert store.status(tenant.id, "bot").version is None
    actions = [e.action for e in registry.audit_log(tenant_id=tenant.id)]
    assert {"adapter.shadow", "adapter.shadow_clear"} <= set(actions)
    with pytest.raises(Conflict, match="no shadow alias"):
        registry.clear_shadow(tenant.id, "bot", USER)


def test_a_shadow_needs_production_another_active_version_and_a_share(
    registry: Registry, tenant: Tenant, bot_v1: AdapterVersion, adapters: dict[str, Path]
) -> None:
    assert tenant.id is not None
    registry.push_adapter(tenant.id, "bot", adapters["v2"], BASE_NAME, USER)
    with pytest.raises(Conflict, match="no production version"):
        registry.set_shadow(tenant.id, "bot", 2, 0.5, USER)
    registry.promote(tenant.id, "bot", 1, USER)
    with pytest.raises(Conflict, match="is the production version"):
        registry.set_shadow(tenant.id, "bot", 1, 0.5, USER)
    for share in (0.0, 1.5, -0.1):
        with pytest.raises(InvalidRequest, match="outside"):
            registry.set_shadow(tenant.id, "bot", 2, share, USER)
    with pytest.raises(NotFound):
        registry.set_shadow(tenant.id, "bot", 9, 0.5, USER)
    registry.set_shadow(tenant.id, "bot", 2, 1.0, USER)
    with pytest.raises(Conflict, match="clear the shadow"):
        registry.archive(tenant.id, "bot", 2, USER)


def test_comparisons_strip_whitespace_and_check_json_by_schema_or_by_production() -> None:
    assert agrees(["  yes\n"], ["yes"]) and not agrees(["yes"], ["no"])
    assert not agrees(["a", "b"], ["a"])
    schema = {"type": "object", "required": ["intent"]}
    assert json_check([INTENT], [INTENT], schema) == (1, 1)
    assert json_check([INTENT], ['{"other": 1}'], schema) == (1, 0)
    assert json_check(["plain"], ["not json"], schema) == (1, 0)  # a schema always applies
    assert json_check([INTENT], ["not json"], None) == (1, 0)  # production answered JSON
    assert json_check([INTENT], ["[1, 2]"], None) == (1, 1)
    assert json_check(["plain text"], ["{}"], None) == (0, 0)  # nothing to check


def test_batches_from_concurrent_gateways_add_up(
    registry: Registry, tenant: Tenant, bot_v2: AdapterVersion
) -> None:
    assert tenant.id is not None
    store = ShadowStore(registry)
    registry.set_shadow(tenant.id, "bot", 2, 1.0, USER)
    pairs = [(INTENT, INTENT), (INTENT, '{"intent": "other"}'), (INTENT, "oops")]

    def gateway() -> None:
        for _ in range(5):
            store.add(_batch(tenant, pairs, failed=1, prompt_tokens=10, completion_tokens=4))

    threads = [threading.Thread(target=gateway) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = store.status(tenant.id, "bot").to_json()["results"]
    assert results["compared"] == 60 and results["agreed"] == 20
    assert results["json_checked"] == 60
    assert (results["failed"], results["prompt_tokens"], results["completion_tokens"]) == (
        20,
        200,
        80,
    )
    assert results["agreement"] == pytest.approx(1 / 3)
    assert results["json_valid"] == pytest.approx(2 / 3)


def test_recorded_results_are_eval_results_that_gates_use(
    registry: Registry, tenant: Tenant, bot_v2: AdapterVersion
) -> None:
    assert tenant.id is not None
    store = ShadowStore(registry)
    registry.set_gates(tenant.id, "bot", [Gate("shadow", "agreement", min_value=0.8)], USER)
    with pytest.raises(Conflict, match="no shadow alias"):
        store.record_eval(tenant.id, "bot", None, USER)
    registry.set_shadow(tenant.id, "bot", 2, 1.0, USER)
    with pytest.raises(Conflict, match="answered no shadow copies"):
        store.record_eval(tenant.id, "bot", None, USER)
    store.add(_batch(tenant, [("yes", "yes"), ("yes", "no")]))
    recorded = store.record_eval(tenant.id, "bot", None, USER)
    assert [(r.suite, r.metric, r.value, r.sample_count) for r in recorded] == [
        ("shadow", "agreement", 0.5, 2)
    ]  # plain-text answers: no JSON check applied, so no json_valid
    with pytest.raises(GateFailed, match=r"shadow/agreement: 0\.5"):
        registry.promote(tenant.id, "bot", 2, USER)
    store.add(_batch(tenant, [("yes", "yes")] * 8))
    store.record_eval(tenant.id, "bot", 2, USER)  # 9 of 10
    registry.promote(tenant.id, "bot", 2, USER)
    assert registry.eval_results(tenant.id, "bot", 2)[-1].value == pytest.approx(0.9)


def test_a_foreign_adapter_is_answered_like_an_unknown_one(
    registry: Registry, tenant: Tenant, bot_v2: AdapterVersion
) -> None:
    other = registry.create_tenant("globex", USER)
    assert other.id is not None
    store = ShadowStore(registry)
    for name in ("bot", "nothing-here"):
        with pytest.raises(NotFound) as caught:
            store.status(other.id, name)
        assert str(caught.value) == str(NotFound(
            f"adapter {name!r} does not exist; list your adapters to see the names"
        ))  # fmt: skip
        with pytest.raises(NotFound):
            registry.set_shadow(other.id, name, 2, 0.5, USER)
    foreign = ShadowBatch(other.id, "bot", 2, 1, pairs=[(["a"], ["a"])])
    with pytest.raises(NotFound):
        store.add(foreign)
    assert store.status(tenant.id, "bot").result is None
