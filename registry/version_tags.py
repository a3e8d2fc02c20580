"""Free-form ``key=value`` tags on adapter versions, and a search over tags and aliases.

A tag says something about one version that the registry does not model (``team=search``,
``dataset=2026-11``, ``ticket=OPS-12``): set (``PUT``, merged into the version's tags) and
deleted one key at a time, each change audited (``adapter.tags`` / ``adapter.tag_delete``)
in its own transaction, under the adapter's row lock. Bounded: keys of at most
``MAX_KEY_LENGTH`` characters in the alias/adapter name form plus ``/`` and ``:``, values of
at most ``MAX_VALUE_LENGTH`` printable characters, ``MAX_TAGS`` tags per version.

``search`` answers "which versions have these tags and these aliases" (MLflow's registry
cannot search aliases): every filter must hold, a tag filter as ``key=value`` (that value)
or ``key`` (any value). It only ever reads the caller's own adapters.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Index, UniqueConstraint
from sqlmodel import Field, Session, SQLModel, col, select

from registry import audit
from registry.errors import InvalidRequest, NotFound
from registry.lifecycle import Change
from registry.models import Adapter, AdapterVersion, Alias, timestamp_column, utcnow
from registry.registry import Registry
from registry.values import Actor

MAX_KEY_LENGTH = 64
MAX_VALUE_LENGTH = 256
MAX_TAGS = 32
"""Tags one version may carry."""
MAX_RESULTS = 1000
"""Versions one search answers at most (the newest first)."""
_KEY = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._/:-]{{0,{MAX_KEY_LENGTH - 1}}}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class VersionTag(SQLModel, table=True):
    """One tag of one version (a key at most once per version)."""

    __tablename__ = "version_tags"
    __table_args__ = (
        UniqueConstraint("version_id", "key"),
        Index("ix_version_tags_key_value", "key", "value"),
    )

    id: int | None = Field(default=None, primary_key=True)
    version_id: int = Field(foreign_key="adapter_versions.id", index=True)
    key: str = Field(max_length=MAX_KEY_LENGTH)
    value: str = Field(default="", max_length=MAX_VALUE_LENGTH)
    updated_at: dt.datetime = timestamp_column()


def tag_problems(key: str, value: str) -> list[str]:
    """What is wrong with tag ``key=value`` (nothing: an empty list)."""
    problems = []
    if _KEY.fullmatch(key) is None:
        problems.append(
            f"tag key {key!r} is not valid: use 1-{MAX_KEY_LENGTH} ASCII letters, digits, "
            "'.', '_', '-', '/' or ':', starting with a letter or digit"
        )
    if len(value) > MAX_VALUE_LENGTH:
        problems.append(
            f"tag {key!r} has a {len(value)}-character value; the limit is {MAX_VALUE_LENGTH}"
        )
    if _CONTROL.search(value):
        problems.append(f"tag {key!r} has control characters in its value; remove them")
    return problems


def parse_tag_filter(text: str) -> tuple[str, str | None]:
    """``key=value`` as (key, value), ``key`` as (key, None: any value)."""
    key, sep, value = text.partition("=")
    problems = tag_problems(key, value)
    if problems:
        raise InvalidRequest(f"tag filter {text!r}: {'; '.join(problems)} (use key=value or key)")
    return key, value if sep else None


@dataclass(frozen=True)
class Match:
    """A version a search found, with its adapter's name, its tags and its aliases."""

    adapter: str
    version: AdapterVersion
    tags: dict[str, str]
    aliases: list[str]


class VersionTags:
    """Tags of the tenant's versions, and the search over them (``registry`` locks writes)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def set_tags(
        self, tenant_id: int, name: str, number: int, tags: Mapping[str, str], actor: Actor
    ) -> dict[str, str]:
        """Merge ``tags`` into version ``number``'s; its tags after. Every problem is
        listed in one ``InvalidRequest`` and nothing is written."""
        problems = [p for key, value in sorted(tags.items()) for p in tag_problems(key, value)]
        if not tags:
            problems.append('no tags given; pass {"tags": {"key": "value"}}')
        if problems:
            raise InvalidRequest("; ".join(problems))
        with self.registry._locked(tenant_id, name, actor, number) as (s, adapter, change):
            version = self.registry._version(s, adapter, number)
            rows = _rows(s, version)
            before = {key: row.value for key, row in rows.items()}
            after = {**before, **tags}
            if len(after) > MAX_TAGS:
                raise InvalidRequest(
                    f"version {number} would carry {len(after)} tags; the limit is {MAX_TAGS} "
                    "(delete some first)"
                )
            for key, value in tags.items():
                row = rows.get(key) or VersionTag(version_id=version.id or 0, key=key)
                row.value, row.updated_at = value, utcnow()
                s.add(row)
            _audit(s, change, "adapter.tags", number, before, after)
        return dict(sorted(after.items()))

    def delete_tag(self, tenant_id: int, name: str, number: int, key: str, actor: Actor) -> None:
        """Remove tag ``key`` of version ``number``; ``NotFound`` when it has none so named."""
        with self.registry._locked(tenant_id, name, actor, number) as (s, adapter, change):
            version = self.registry._version(s, adapter, number)
            rows = _rows(s, version)
            if key not in rows:
                raise NotFound(f"version {number} of adapter {name!r} has no tag {key!r}")
            before = {k: row.value for k, row in rows.items()}
            s.delete(rows[key])
            after = {k: v for k, v in before.items() if k != key}
            _audit(s, change, "adapter.tag_delete", number, before, after)

    def tags(self, tenant_id: int, name: str, number: int) -> dict[str, str]:
        with self.registry._read() as s:
            adapter = self.registry._own_adapter(s, tenant_id, name)
            version = self.registry._version(s, adapter, number)
            return {key: row.value for key, row in sorted(_rows(s, version).items())}

    def search(
        self,
        tenant_id: int,
        tags: Sequence[tuple[str, str | None]] = (),
        aliases: Sequence[str] = (),
    ) -> list[Match]:
        """The tenant's versions with every tag (a value, or None: any) and every alias
        given, by adapter name and version number (at most ``MAX_RESULTS``)."""
        query = (
            select(AdapterVersion, Adapter)
            .join(Adapter, col(Adapter.id) == AdapterVersion.adapter_id)
            .where(Adapter.tenant_id == tenant_id)
        )
        for key, value in tags:
            tagged = select(VersionTag.version_id).where(VersionTag.key == key)
            if value is not None:
                tagged = tagged.where(VersionTag.value == value)
            query = query.where(col(AdapterVersion.id).in_(tagged))
        for alias in aliases:
            aliased = select(Alias.version_id).where(Alias.name == alias)
            query = query.where(col(AdapterVersion.id).in_(aliased))
        order = (col(Adapter.name), col(AdapterVersion.number))
        with self.registry._read() as s:
            rows = s.exec(query.order_by(*order).limit(MAX_RESULTS)).all()
            ids = [v.id for v, _ in rows]
            found_tags, found_aliases = _labels(s, ids)
        return [
            Match(a.name, v, found_tags.get(v.id, {}), found_aliases.get(v.id, [])) for v, a in rows
        ]


def _rows(s: Session, version: AdapterVersion) -> dict[str, VersionTag]:
    rows = s.exec(select(VersionTag).where(VersionTag.version_id == version.id)).all()
    return {row.key: row for row in rows}


def _labels(
    s: Session, ids: list[int | None]
) -> tuple[dict[int | None, dict[str, str]], dict[int | None, list[str]]]:
    """The tags and the alias names of the versions ``ids``, by version id."""
    tags: dict[int | None, dict[str, str]] = {}
    aliases: dict[int | None, list[str]] = {}
    if not ids:
        return tags, aliases
    for tag in s.exec(
        select(VersionTag).where(col(VersionTag.version_id).in_(ids)).order_by(col(VersionTag.key))
    ):
        tags.setdefault(tag.version_id, {})[tag.key] = tag.value
    for alias in s.exec(
        select(Alias).where(col(Alias.version_id).in_(ids)).order_by(col(Alias.name))
    ):
        aliases.setdefault(alias.version_id, []).append(alias.name)
    return tags, aliases


def _audit(
    s: Session,
    change: Change,
    action: str,
    number: int,
    before: dict[str, str],
    after: dict[str, str],
) -> None:
    audit.record(
        s,
        change.actor,
        action,
        change.subject,
        tenant_id=change.tenant_id,
        before={"version": number, "tags": dict(sorted(before.items()))},
        after={"version": number, "tags": dict(sorted(after.items()))},
    )
