"""``loraplex adapters alias|aliases|tag|search``: custom aliases, version tags and the
search over both, from a shell (``registry.custom_aliases``, ``registry.version_tags``).

- ``alias NAME ALIAS VERSION --tenant T``: point custom alias ALIAS (``staging``) at
  VERSION; requests name it ``NAME:ALIAS``. ``alias NAME ALIAS --delete``: remove it;
- ``aliases NAME --tenant T``: every alias of NAME, built-in ones included;
  ``--history ALIAS``: how one got where it is;
- ``tag NAME VERSION k=v ... --tenant T``: merge tags into VERSION's;
  ``--delete k ...`` removes keys; no tags: print them;
- ``search --tag k=v --tag k --alias staging --tenant T``: the tenant's versions that hold
  every filter, with their tags and aliases.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from registry import InvalidRequest, Registry
from registry.custom_aliases import CustomAliases
from registry.version_tags import VersionTags, parse_tag_filter
from server.cli.registry_commands import (
    _command,
    _tenant_flag,
    _tenant_id,
    operator,
    print_table,
)


def adapters_alias(registry: Registry, args: argparse.Namespace) -> int:
    store, tenant_id = CustomAliases(registry), _tenant_id(registry, args)
    if args.delete:
        store.delete_alias(tenant_id, args.name, args.alias, operator())
        print(f"{args.name}: alias {args.alias} deleted")
        return 0
    if args.version is None:
        print("loraplex: give a VERSION, or --delete", file=sys.stderr)
        return 2
    store.set_alias(tenant_id, args.name, args.alias, args.version, operator())
    print(f"{args.name}: {args.alias} -> version {args.version} (request it as "
          f"{args.name}:{args.alias})")  # fmt: skip
    return 0


def adapters_aliases(registry: Registry, args: argparse.Namespace) -> int:
    store, tenant_id = CustomAliases(registry), _tenant_id(registry, args)
    if args.history:
        info = store.get_alias(tenant_id, args.name, args.history)
        rows = [
            [f"{m.created_at:%Y-%m-%d %H:%M:%S}", m.action, m.previous_version, m.version, m.actor]
            for m in info.history
        ]
        print_table(["TIME", "ACTION", "FROM", "TO", "ACTOR"], rows)
        return 0
    rows = [
        [a.alias, a.version, "built-in" if a.built_in else "custom", f"{a.updated_at:%F %H:%M}"]
        for a in store.list_aliases(tenant_id, args.name)
    ]
    print_table(["ALIAS", "VERSION", "KIND", "UPDATED"], rows)
    return 0


def adapters_tag(registry: Registry, args: argparse.Namespace) -> int:
    store, tenant_id = VersionTags(registry), _tenant_id(registry, args)
    for key in args.delete or []:
        store.delete_tag(tenant_id, args.name, args.version, key, operator())
    if args.tags:
        store.set_tags(tenant_id, args.name, args.version, _pairs(args.tags), operator())
    tags = store.tags(tenant_id, args.name, args.version)
    print_table(["KEY", "VALUE"], sorted(tags.items()))
    return 0


def _pairs(items: list[str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidRequest(f"tag {item!r} has no value; write key=value")
        pairs[key] = value
    return pairs


def adapters_search(registry: Registry, args: argparse.Namespace) -> int:
    filters = [parse_tag_filter(t) for t in args.tag or []]
    matches = VersionTags(registry).search(_tenant_id(registry, args), filters, args.alias or [])
    rows = [
        [
            m.adapter,
            m.version.number,
            m.version.state,
            ",".join(m.aliases) or None,
            " ".join(f"{k}={v}" for k, v in m.tags.items()) or None,
        ]
        for m in matches
    ]
    print_table(["ADAPTER", "VERSION", "STATE", "ALIASES", "TAGS"], rows)
    return 0


def add_commands(sub: Any) -> None:
    """Add ``alias``, ``aliases``, ``tag`` and ``search`` to the ``adapters`` group."""
    adapters = sub.choices["adapters"]
    group = next(a for a in adapters._actions if isinstance(a, argparse._SubParsersAction))
    alias = _command(group, "alias", adapters_alias, "point a custom alias at a version")
    alias.add_argument("name")
    alias.add_argument("alias", help="e.g. staging (not production, canary or shadow)")
    alias.add_argument("version", type=int, nargs="?")
    alias.add_argument("--delete", action="store_true", help="remove the alias")
    _tenant_flag(alias)
    aliases = _command(group, "aliases", adapters_aliases, "list an adapter's aliases")
    aliases.add_argument("name")
    aliases.add_argument("--history", metavar="ALIAS", help="show one alias's moves")
    _tenant_flag(aliases)
    tag = _command(group, "tag", adapters_tag, "set, delete or show a version's tags")
    tag.add_argument("name")
    tag.add_argument("version", type=int)
    tag.add_argument("tags", nargs="*", metavar="KEY=VALUE")
    tag.add_argument("--delete", action="append", metavar="KEY", help="remove a tag")
    _tenant_flag(tag)
    search = _command(group, "search", adapters_search, "find versions by tags and aliases")
    search.add_argument("--tag", action="append", metavar="KEY[=VALUE]", help="all must hold")
    search.add_argument("--alias", action="append", help="an alias the version has")
    _tenant_flag(search)
