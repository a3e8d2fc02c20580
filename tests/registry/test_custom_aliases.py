"""Custom aliases (registry/custom_aliases.py) on SQLite and PostgreSQL: set, move and
delete with history, audit and public events; the names refused (built-in ones, ones a
request cannot address); versions an alias holds stay in use; tenant isolation."""

from __future__ import annotations

from pathlib import Path

import pytest
from foreign_checks import assert_foreign_reads_as_unknown
from hypothesis import given
from hypothesis import strategies as st
from registry_testdata import BASE_NAME

from registry import (
    Actor,
    AdapterVersion,
    Conflict,
    InvalidRequest,
    NotFound,
    Registry,
    Tenant,
)
from registry.custom_aliases import MAX_CUSTOM_ALIASES, CustomAliases, check_alias_name
from registry.events import EventLog
from router import InvalidModelName, RefKind, parse_model_name

USER = Actor("key:7")


@pytest.fixture
def bot_v2(bot_v1: AdapterVersion, registry: Registry, adapters: dict[str, Path]) -> AdapterVersion:
    """Version 2 of ``bot`` (acme's), pushed after version 1 went to production."""
    acme = _acme(registry)
    registry.promote(acme, "bot", bot_v1.number, USER)
    return registry.push_adapter(acme, "bot", adapters["v2"], BASE_NAME, USER)


def _acme(registry: Registry) -> int:
    return registry.get_tenant("acme").id or 0


def test_an_alias_is_set_moved_and_deleted_with_history_audit_and_events(
    registry: Registry, tenant: Tenant, bot_v2: AdapterVersion
) -> None:
    assert tenant.id is not None
    store = CustomAliases(registry)
    after = EventLog(registry).latest_id()
    assert store.set_alias(tenant.id, "bot", "staging", 2, USER).version == 2
    assert registry.aliases(tenant.id, "bot")["staging"].version == 2
    store.set_alias(tenant.id, "bot", "staging", 1, USER)
    listed = {a.alias: (a.version, a.built_in) for a in store.list_aliases(tenant.id, "bot")}
    assert listed == {"production": (1, True), "staging": (1, False)}
    store.delete_alias(tenant.id, "bot", "staging", USER)
    assert "staging" not in registry.aliases(tenant.id, "bot")
    with pytest.raises(NotFound, match="no alias 'staging'"):
        store.get_alias(tenant.id, "bot", "staging")
    store.set_alias(tenant.id, "bot", "staging", 2, USER)
    history = store.get_alias(tenant.id, "bot", "staging").history
    assert [(m.action, m.version, m.previous_version, m.actor) for m in history] == [
        ("adapter.alias_set", 2, None, "key:7"),
        ("adapter.alias_set", 1, 2, "key:7"),
        ("adapter.alias_delete", None, 1, "key:7"),
        ("adapter.alias_set", 2, None, "key:7"),
    ]
    audited = registry.audit_log(tenant_id=tenant.id, action="adapter.alias_set")
    assert audited[0].before == {"aliases": {"production": {"version": 1, "weight": 1.0}}}
    assert audited[0].after is not None and audited[0].after["alias"] == "staging"
    events = EventLog(registry).read(tenant.id, after=after)
    assert [(e.type, e.data.get("version")) for e in events] == [
        ("adapter.alias.set", 2),
        ("adapter.alias.set", 1),
        ("adapter.alias.deleted", None),
        ("adapter.alias.set", 2),
    ]
    deleted = events[2].data
    assert (deleted["adapter"], deleted["after"]["previous_version"]) == ("bot", 1)


@pytest.mark.parametrize(
    ("alias", "words"),
    [
        ("production", "loraplex adapters promote"),
        ("Canary", "loraplex adapters canary"),
        ("shadow", "loraplex adapters shadow"),
        ("", "not valid"),
        ("-x", "not valid"),
        ("a" * 65, "not valid"),
        ("st\u0430ging", "not valid"),  # a Cyrillic a
        ("a:b", "not valid"),
    ],
)
def test_built_in_and_unaddressable_names_are_refused(
    registry: Registry, tenant: Tenant, bot_v2: AdapterVersion, alias: str, words: str
) -> None:
    assert tenant.id is not None
    store = CustomAliases(registry)
    with pytest.raises(InvalidRequest, match=words):
        store.set_alias(tenant.id, "bot", alias, 2, USER)
    with pytest.raises(InvalidRequest, match=words):
        store.delete_alias(tenant.id, "bot", alias, USER)
    assert registry.aliases(tenant.id, "bot").keys() == {"production"}


def test_an_alias_holds_its_version_in_use_and_only_active_ones_are_aliased(
    registry: Registry, tenant: Tenant, bot_v2: AdapterVersion
) -> None:
    assert tenant.id is not None
    store = CustomAliases(registry)
    store.set_alias(tenant.id, "bot", "staging", 2, USER)
    for withdraw in (registry.retire, registry.archive):
        with pytest.raises(Conflict, match=r"target of alias\(es\) staging.*custom alias"):
            withdraw(tenant.id, "bot", 2, USER)
    store.delete_alias(tenant.id, "bot", "staging", USER)
    registry.archive(tenant.id, "bot", 2, USER)
    with pytest.raises(Conflict, match="version 2 is archived; only active versions can be"):
        store.set_alias(tenant.id, "bot", "staging", 2, USER)
    with pytest.raises(NotFound, match="no version 9"):
        store.set_alias(tenant.id, "bot", "staging", 9, USER)
    with pytest.raises(NotFound, match="no alias 'staging'"):
        store.delete_alias(tenant.id, "bot", "staging", USER)


def test_an_adapter_has_at_most_so_many_custom_aliases(
    registry: Registry, tenant: Tenant, bot_v2: AdapterVersion
) -> None:
    assert tenant.id is not None
    store = CustomAliases(registry)
    for n in range(MAX_CUSTOM_ALIASES):
        store.set_alias(tenant.id, "bot", f"a{n}", 2, USER)
    with pytest.raises(Conflict, match=f"already has {MAX_CUSTOM_ALIASES} custom aliases"):
        store.set_alias(tenant.id, "bot", "one-more", 2, USER)
    store.set_alias(tenant.id, "bot", "a0", 1, USER)  # moving one is no new alias


def test_another_tenants_adapter_answers_like_an_unknown_one(
    registry: Registry, tenant: Tenant, bot_v2: AdapterVersion
) -> None:
    other = registry.create_tenant("globex", USER).id or 0
    store = CustomAliases(registry)
    store.set_alias(tenant.id or 0, "bot", "staging", 2, USER)
    assert_foreign_reads_as_unknown(
        [
            lambda n: store.set_alias(other, n, "staging", 1, USER),
            lambda n: store.delete_alias(other, n, "staging", USER),
            lambda n: store.list_aliases(other, n),
            lambda n: store.get_alias(other, n, "staging"),
        ]
    )
    assert registry.aliases(tenant.id or 0, "bot")["staging"].version == 2


def _settable(alias: str) -> bool:
    try:
        check_alias_name(alias)
    except InvalidRequest:
        return False
    return True


@given(alias=st.text(alphabet="ABCabcxyz0189._-:@/ \u043e\u00e9\uff11", max_size=70))
def test_the_alias_names_allowed_are_those_a_request_addresses(alias: str) -> None:
    try:
        ref = parse_model_name(f"bot:{alias}", ())
        addressable = ref.kind is RefKind.ALIAS and ref.alias == alias
    except InvalidModelName:
        addressable = False
    built_in = alias.lower() in ("production", "canary", "shadow")
    assert _settable(alias) == (addressable and not built_in)
