"""Version tags and the search over tags and aliases (registry/version_tags.py) on SQLite
and PostgreSQL: merged, deleted and audited; bounded with every problem listed; search
holds every filter and never answers another tenant's versions."""

from __future__ import annotations

from pathlib import Path

import pytest
from foreign_checks import assert_foreign_reads_as_unknown
from registry_testdata import BASE_NAME

from registry import Actor, BaseModelRecord, InvalidRequest, NotFound, Registry, Tenant
from registry.custom_aliases import CustomAliases
from registry.version_tags import MAX_TAGS, MAX_VALUE_LENGTH, VersionTags, parse_tag_filter

USER = Actor("key:7")


@pytest.fixture
def bot_v2(
    registry: Registry, tenant: Tenant, base: BaseModelRecord, adapters: dict[str, Path]
) -> None:
    """acme's ``bot``: versions 1 and 2, version 1 in production."""
    for seed in ("v1", "v2"):
        registry.push_adapter(tenant.id or 0, "bot", adapters[seed], BASE_NAME, USER)
    registry.promote(tenant.id or 0, "bot", 1, USER)


def test_tags_are_merged_deleted_and_audited(
    registry: Registry, tenant: Tenant, bot_v2: None
) -> None:
    assert tenant.id is not None
    tags = VersionTags(registry)
    assert tags.set_tags(tenant.id, "bot", 2, {"team": "search", "ds": "nov"}, USER) == {
        "ds": "nov",
        "team": "search",
    }
    merged = tags.set_tags(tenant.id, "bot", 2, {"team": "ads", "ticket": "OPS-1=a"}, USER)
    assert merged == {"ds": "nov", "team": "ads", "ticket": "OPS-1=a"}
    tags.delete_tag(tenant.id, "bot", 2, "ds", USER)
    assert tags.tags(tenant.id, "bot", 2) == {"team": "ads", "ticket": "OPS-1=a"}
    assert tags.tags(tenant.id, "bot", 1) == {}
    with pytest.raises(NotFound, match="has no tag 'ds'"):
        tags.delete_tag(tenant.id, "bot", 2, "ds", USER)
    events = registry.audit_log(tenant_id=tenant.id, subject_prefix="adapter:acme/bot@2")
    tagged = [(e.action, e.after) for e in events if e.action.startswith("adapter.tag")]
    assert tagged[-1] == (
        "adapter.tag_delete",
        {"version": 2, "tags": {"team": "ads", "ticket": "OPS-1=a"}},
    )
    assert len(tagged) == 3


def test_bad_tags_are_refused_with_every_problem_and_nothing_written(
    registry: Registry, tenant: Tenant, bot_v2: None
) -> None:
    assert tenant.id is not None
    tags = VersionTags(registry)
    bad = {"-x": "1", "ok": "v" * (MAX_VALUE_LENGTH + 1), "nl": "a\nb", "fine": "yes"}
    with pytest.raises(InvalidRequest) as refused:
        tags.set_tags(tenant.id, "bot", 2, bad, USER)
    message = str(refused.value)
    assert "'-x' is not valid" in message and "256" in message and "control" in message
    with pytest.raises(InvalidRequest, match="no tags given"):
        tags.set_tags(tenant.id, "bot", 2, {}, USER)
    many = {f"k{n}": "v" for n in range(MAX_TAGS)}
    tags.set_tags(tenant.id, "bot", 2, many, USER)
    with pytest.raises(InvalidRequest, match=f"the limit is {MAX_TAGS}"):
        tags.set_tags(tenant.id, "bot", 2, {"one-more": "v"}, USER)
    assert "fine" not in tags.tags(tenant.id, "bot", 2)
    with pytest.raises(NotFound, match="no version 7"):
        tags.set_tags(tenant.id, "bot", 7, {"a": "b"}, USER)


def test_search_holds_every_tag_and_alias_filter(
    registry: Registry, tenant: Tenant, bot_v2: None, adapters: dict[str, Path]
) -> None:
    assert tenant.id is not None
    registry.push_adapter(tenant.id, "helper", adapters["v3"], BASE_NAME, USER)
    tags = VersionTags(registry)
    tags.set_tags(tenant.id, "bot", 1, {"team": "search"}, USER)
    tags.set_tags(tenant.id, "bot", 2, {"team": "search", "ds": "nov"}, USER)
    tags.set_tags(tenant.id, "helper", 1, {"team": "ads"}, USER)
    CustomAliases(registry).set_alias(tenant.id, "bot", "staging", 2, USER)

    def found(tag: list[str], alias: list[str]) -> list[tuple[str, int]]:
        filters = [parse_tag_filter(t) for t in tag]
        matches = tags.search(tenant.id or 0, filters, alias)
        return [(m.adapter, m.version.number) for m in matches]

    assert found([], []) == [("bot", 1), ("bot", 2), ("helper", 1)]
    assert found(["team=search"], []) == [("bot", 1), ("bot", 2)]
    assert found(["team"], []) == [("bot", 1), ("bot", 2), ("helper", 1)]
    assert found(["team=search", "ds"], []) == [("bot", 2)]
    assert found([], ["staging"]) == [("bot", 2)]
    assert found([], ["production"]) == [("bot", 1)]
    assert found(["team=ads"], ["staging"]) == []
    assert found(["team=nobody"], []) == []
    match = tags.search(tenant.id, [("ds", "nov")], ["staging"])[0]
    assert (match.tags, match.aliases) == ({"ds": "nov", "team": "search"}, ["staging"])
    with pytest.raises(InvalidRequest, match="tag filter '=x'"):
        parse_tag_filter("=x")


def test_another_tenants_versions_are_never_tagged_or_found(
    registry: Registry, tenant: Tenant, bot_v2: None
) -> None:
    other = registry.create_tenant("globex", USER).id or 0
    tags = VersionTags(registry)
    tags.set_tags(tenant.id or 0, "bot", 2, {"team": "search"}, USER)
    CustomAliases(registry).set_alias(tenant.id or 0, "bot", "staging", 2, USER)
    for tag_filters, alias_filters in [([("team", "search")], []), ([], ["staging"]), ([], [])]:
        assert tags.search(other, tag_filters, alias_filters) == []
    assert_foreign_reads_as_unknown(
        [
            lambda n: tags.set_tags(other, n, 2, {"a": "b"}, USER),
            lambda n: tags.delete_tag(other, n, 2, "team", USER),
            lambda n: tags.tags(other, n, 2),
        ]
    )
    assert tags.tags(tenant.id or 0, "bot", 2) == {"team": "search"}
