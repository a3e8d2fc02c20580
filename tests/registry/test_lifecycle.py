"""Promote, canary, rollback, archive, retire, base deprecation: aliases and audit."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ADMIN
from registry_testdata import BASE_NAME

from registry import (
    AliasTarget,
    BaseModelRecord,
    Conflict,
    InvalidRequest,
    NotFound,
    Registry,
    Tenant,
)

ALICE = ADMIN


@pytest.fixture
def bot(
    registry: Registry, base: BaseModelRecord, tenant: Tenant, adapters: dict[str, Path]
) -> int:
    """Tenant id of an adapter "bot" with versions 1..3."""
    assert tenant.id is not None
    for key in ("v1", "v2", "v3"):
        registry.push_adapter(tenant.id, "bot", adapters[key], BASE_NAME, ALICE)
    return tenant.id


def _production(registry: Registry, tenant_id: int) -> int | None:
    target = registry.aliases(tenant_id, "bot").get("production")
    return None if target is None else target.version


def test_promote_points_production_and_audits_in_one_event(registry: Registry, bot: int) -> None:
    registry.promote(bot, "bot", 1, ALICE)
    registry.promote(bot, "bot", 2, ALICE)
    view = registry.routing_view(bot, "bot")
    assert view is not None
    v2 = registry.get_version(bot, "bot", 2)
    assert view.aliases == {"production": AliasTarget(2, v2.lora_name, 1.0)}
    events = registry.audit_log(action="adapter.promote")
    assert [e.subject for e in events] == ["adapter:acme/bot", "adapter:acme/bot"]
    assert events[-1].before == {"aliases": {"production": {"version": 1, "weight": 1.0}}}
    assert events[-1].after == {"aliases": {"production": {"version": 2, "weight": 1.0}}}
    assert events[-1].actor == ALICE.name and events[-1].tenant_id == bot


def test_rollback_walks_back_through_promotes(registry: Registry, bot: int) -> None:
    for number in (1, 2, 3):
        registry.promote(bot, "bot", number, ALICE)
    assert registry.rollback(bot, "bot", ALICE).number == 2
    assert _production(registry, bot) == 2
    assert registry.rollback(bot, "bot", ALICE).number == 1
    with pytest.raises(Conflict, match="no earlier production version to roll back to"):
        registry.rollback(bot, "bot", ALICE)
    assert _production(registry, bot) == 1
    rollbacks = registry.audit_log(action="adapter.rollback")
    assert [e.after["aliases"]["production"]["version"] for e in rollbacks if e.after] == [2, 1]


def test_rollback_after_a_new_promote_returns_to_the_one_before_it(
    registry: Registry, bot: int
) -> None:
    registry.promote(bot, "bot", 1, ALICE)
    registry.promote(bot, "bot", 2, ALICE)
    registry.rollback(bot, "bot", ALICE)
    registry.promote(bot, "bot", 3, ALICE)
    assert registry.rollback(bot, "bot", ALICE).number == 1


def test_canary_carries_a_weight(registry: Registry, bot: int) -> None:
    registry.promote(bot, "bot", 1, ALICE)
    registry.canary(bot, "bot", 2, 0.25, ALICE)
    aliases = registry.aliases(bot, "bot")
    assert (aliases["canary"].version, aliases["canary"].weight) == (2, 0.25)
    with pytest.raises(InvalidRequest, match=r"outside 0\.\.1"):
        registry.canary(bot, "bot", 3, 1.5, ALICE)
    registry.clear_canary(bot, "bot", ALICE)
    assert "canary" not in registry.aliases(bot, "bot")
    with pytest.raises(Conflict, match="no canary alias"):
        registry.clear_canary(bot, "bot", ALICE)


def test_retire_and_archive_are_refused_while_an_alias_points_at_the_version(
    registry: Registry, bot: int
) -> None:
    registry.promote(bot, "bot", 1, ALICE)
    registry.canary(bot, "bot", 2, 0.1, ALICE)
    for verb in (registry.retire, registry.archive):
        with pytest.raises(Conflict, match="target of alias\\(es\\) production"):
            verb(bot, "bot", 1, ALICE)
        with pytest.raises(Conflict, match="target of alias\\(es\\) canary"):
            verb(bot, "bot", 2, ALICE)
    assert registry.retire(bot, "bot", 3, ALICE).state == "retired"
    view = registry.routing_view(bot, "bot")
    assert view is not None and [v.number for v in view.versions] == [1, 2]
    assert registry.version_by_lora_name(registry.get_version(bot, "bot", 3).lora_name) is None
    with pytest.raises(
        Conflict, match="version 3 is retired; only active versions can be promoted"
    ):
        registry.promote(bot, "bot", 3, ALICE)
    with pytest.raises(Conflict, match="retired versions stay retired"):
        registry.archive(bot, "bot", 3, ALICE)


def test_archived_version_cannot_be_rolled_back_to(registry: Registry, bot: int) -> None:
    registry.promote(bot, "bot", 1, ALICE)
    registry.promote(bot, "bot", 2, ALICE)
    registry.archive(bot, "bot", 1, ALICE)
    with pytest.raises(Conflict, match="version 1 is archived; only active versions can be rolled"):
        registry.rollback(bot, "bot", ALICE)
    assert _production(registry, bot) == 2


def test_deprecating_a_base_flags_every_pinned_version(
    registry: Registry, bot: int, base: BaseModelRecord
) -> None:
    assert registry.deprecate_base(base.fingerprint, "replaced by r2", ALICE) == 3
    assert all(v.base_deprecated for v in registry.list_versions(bot, "bot"))
    assert registry.get_base(BASE_NAME).deprecation_reason == "replaced by r2"
    (event,) = registry.audit_log(action="base.deprecate")
    assert event.after == {"reason": "replaced by r2", "flagged_versions": 3}


def test_foreign_and_unknown_adapters_look_the_same(registry: Registry, bot: int) -> None:
    other = registry.create_tenant("globex", ALICE)
    assert other.id is not None
    assert registry.get_adapter(other.id, "bot") is None
    assert registry.routing_view(other.id, "bot") is None
    messages = []
    for tenant_id, name in ((other.id, "bot"), (bot, "nope")):
        with pytest.raises(NotFound) as caught:
            registry.promote(tenant_id, name, 1, ALICE)
        messages.append(str(caught.value).replace("'nope'", "'bot'"))
    assert messages[0] == messages[1]


def test_unknown_version_is_not_found(registry: Registry, bot: int) -> None:
    with pytest.raises(NotFound, match="adapter 'bot' has no version 9; list its versions"):
        registry.promote(bot, "bot", 9, ALICE)
