"""``loraplex tenants|keys|bases|adapters ...``: registry administration from a shell.

Commands act directly on the registry the settings name (database and blob
store), as an admin operator; every change lands in the audit log as
``cli:<user>``. Listings print plain aligned tables; uploads show a progress bar.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from registry import (
    Actor,
    AdapterVersion,
    Registry,
    RegistryError,
    TenantLimits,
    tenant_ref,
)
from registry.captures import CaptureSettings, CaptureStore
from server.config import add_settings_flags, load_settings

Handler = Callable[[argparse.Namespace], int]
REGISTRY_SETTINGS = [
    "home",
    "database_url",
    "blob_url",
    "s3_endpoint_url",
    "max_lora_rank",
    "max_upload_bytes",
]
LIMIT_FLAGS = {
    "requests_per_minute": "--rpm",
    "tokens_per_minute": "--tpm",
    "max_concurrent": "--max-concurrent",
    "max_total_tokens": "--max-total-tokens",
}


def operator() -> Actor:
    return Actor(f"cli:{getpass.getuser()}", admin=True)


def open_registry(args: argparse.Namespace) -> Registry:
    from server.cli.bootstrap import open_registry as from_settings

    return from_settings(load_settings(vars(args)))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Columns padded to their widest cell; no borders, easy to grep and cut."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _registry_command(handler: Callable[[Registry, argparse.Namespace], int]) -> Handler:
    """Open the registry, run ``handler``, turn registry errors into a message and exit 1."""

    def run(args: argparse.Namespace) -> int:
        registry = open_registry(args)
        try:
            return handler(registry, args)
        except RegistryError as exc:
            print(f"loraplex: {exc}", file=sys.stderr)
            return 1
        finally:
            registry.close()

    return run


def _tenant_id(registry: Registry, args: argparse.Namespace) -> int:
    tenant = registry.get_tenant(tenant_ref(args.tenant))
    assert tenant.id is not None
    return tenant.id


def _limits(args: argparse.Namespace) -> TenantLimits:
    return TenantLimits(**{field: getattr(args, field) for field in LIMIT_FLAGS})


# -- tenants ------------------------------------------------------------------------


def tenants_create(registry: Registry, args: argparse.Namespace) -> int:
    tenant = registry.create_tenant(args.name, operator(), _limits(args))
    print(f"created tenant {tenant.name} (id {tenant.id})")
    return 0


def tenants_list(registry: Registry, args: argparse.Namespace) -> int:
    rows = [[t.id, t.name, *(getattr(t, f) for f in LIMIT_FLAGS)] for t in registry.list_tenants()]
    print_table(["ID", "NAME", "RPM", "TPM", "CONCURRENT", "TOTAL_TOKENS"], rows)
    return 0


def tenants_limits(registry: Registry, args: argparse.Namespace) -> int:
    tenant = registry.set_tenant_limits(tenant_ref(args.tenant), _limits(args), operator())
    print(f"limits of {tenant.name}: {json.dumps(asdict(_limits(args)))}")
    return 0


def tenants_capture(registry: Registry, args: argparse.Namespace) -> int:
    if args.on is None:
        settings = CaptureStore(registry).settings(_tenant_id(registry, args))
        print(f"capture of {args.tenant}: {json.dumps(asdict(settings))}")
        return 0
    settings = CaptureSettings(
        enabled=args.on,
        store_by_default=args.store_by_default,
        retention_days=args.retention_days,
        max_body_bytes=args.max_body_bytes,
    )
    name, stored = CaptureStore(registry).set_settings(
        tenant_ref(args.tenant), settings, operator()
    )
    print(f"capture of {name}: {json.dumps(asdict(stored))}")
    return 0


# -- keys ----------------------------------------------------------------------------


def keys_create(registry: Registry, args: argparse.Namespace) -> int:
    tenant_id = None if args.admin else _tenant_id(registry, args)
    scope = "admin" if args.admin else "tenant"
    record, plaintext = registry.create_api_key(tenant_id, scope, operator(), name=args.name)
    print(f"created {scope} key {record.id}; store it now, it is not shown again:", file=sys.stderr)
    print(plaintext)
    return 0


def keys_revoke(registry: Registry, args: argparse.Namespace) -> int:
    record = registry.revoke_api_key(args.key_id, operator())
    print(f"revoked key {record.id} ({record.prefix}...)")
    return 0


def keys_list(registry: Registry, args: argparse.Namespace) -> int:
    tenant_id = _tenant_id(registry, args) if args.tenant else None
    rows = [
        [k.id, k.prefix + "...", k.scope, k.tenant_id, k.name, "revoked" if k.revoked_at else ""]
        for k in registry.list_api_keys(tenant_id)
    ]
    print_table(["ID", "PREFIX", "SCOPE", "TENANT", "NAME", "STATUS"], rows)
    return 0


# -- bases ---------------------------------------------------------------------------


def bases_register(registry: Registry, args: argparse.Namespace) -> int:
    path = Path(args.path)
    base = registry.register_base(path, args.name or path.name, args.revision, operator())
    print(f"registered base {base.name}@{base.revision} fingerprint {base.fingerprint}")
    return 0


def bases_list(registry: Registry, args: argparse.Namespace) -> int:
    rows = [
        [
            b.id,
            b.name,
            b.revision,
            b.fingerprint[:16],
            b.architecture,
            len(b.module_table),
            "deprecated" if b.deprecated_at else "",
        ]
        for b in registry.list_bases()
    ]
    print_table(
        ["ID", "NAME", "REVISION", "FINGERPRINT", "ARCHITECTURE", "MODULES", "STATUS"], rows
    )
    return 0


def bases_deprecate(registry: Registry, args: argparse.Namespace) -> int:
    flagged = registry.deprecate_base(args.base, args.reason, operator())
    print(f"deprecated {args.base}; flagged {flagged} adapter version(s)")
    return 0


# -- adapters ------------------------------------------------------------------------


def adapters_push(registry: Registry, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    tenant_id = _tenant_id(registry, args)
    with tqdm(unit="B", unit_scale=True, desc=f"push {args.name}", file=sys.stderr) as bar:

        def progress(sent: int, total: int) -> None:
            bar.total = total
            bar.update(sent - bar.n)

        version = registry.push_adapter(
            tenant_id,
            args.name,
            Path(args.source),
            args.base,
            operator(),
            description=args.description,
            progress=progress,
        )
    print(
        f"{args.name} version {version.number}: {version.lora_name} "
        f"(fingerprint {version.fingerprint})"
    )
    return 0


def adapters_list(registry: Registry, args: argparse.Namespace) -> int:
    tenant_id = _tenant_id(registry, args)
    rows = []
    for adapter in registry.list_adapters(tenant_id):
        aliases = registry.aliases(tenant_id, adapter.name)
        latest = registry.list_versions(tenant_id, adapter.name)[-1:]
        rows.append(
            [
                adapter.name,
                latest[0].number if latest else None,
                _alias_cell(aliases, "production"),
                _alias_cell(aliases, "canary"),
                adapter.description or None,
            ]
        )
    print_table(["NAME", "LATEST", "PRODUCTION", "CANARY", "DESCRIPTION"], rows)
    return 0


def _alias_cell(aliases: dict[str, Any], name: str) -> str | None:
    target = aliases.get(name)
    if target is None:
        return None
    return f"v{target.version}" + (f" ({target.weight:.0%})" if name == "canary" else "")


def adapters_show(registry: Registry, args: argparse.Namespace) -> int:
    tenant_id = _tenant_id(registry, args)
    aliases = registry.aliases(tenant_id, args.name)
    at: dict[int, list[str]] = {}
    for name, target in sorted(aliases.items()):  # custom ones too: one version, many aliases
        at.setdefault(target.version, []).append(name)
    rows = [
        _version_row(v, ",".join(at.get(v.number, [])))
        for v in registry.list_versions(tenant_id, args.name)
    ]
    print_table(["VERSION", "LORA_NAME", "RANK", "STATE", "BASE", "ALIAS", "CREATED"], rows)
    return 0


def _version_row(v: AdapterVersion, alias: str) -> list[Any]:
    state = v.state + (" (base deprecated)" if v.base_deprecated else "")
    return [
        v.number,
        v.lora_name,
        v.rank,
        state,
        v.base_id,
        alias,
        f"{v.created_at:%Y-%m-%d %H:%M}",
    ]


def adapters_promote(registry: Registry, args: argparse.Namespace) -> int:
    tenant_id = _tenant_id(registry, args)
    version = registry.promote(
        tenant_id, args.name, args.version, operator(), override=args.override
    )
    print(f"{args.name}: production -> version {version.number}")
    return 0


def adapters_canary(registry: Registry, args: argparse.Namespace) -> int:
    tenant_id = _tenant_id(registry, args)
    if args.clear:
        registry.clear_canary(tenant_id, args.name, operator())
        print(f"{args.name}: canary cleared")
        return 0
    if args.version is None:
        print("loraplex: give a VERSION, or --clear", file=sys.stderr)
        return 2
    registry.canary(tenant_id, args.name, args.version, args.weight, operator())
    print(f"{args.name}: canary -> version {args.version} at {args.weight:.0%}")
    return 0


def adapters_rollback(registry: Registry, args: argparse.Namespace) -> int:
    version = registry.rollback(_tenant_id(registry, args), args.name, operator())
    print(f"{args.name}: production rolled back to version {version.number}")
    return 0


def adapters_retire(registry: Registry, args: argparse.Namespace) -> int:
    registry.retire(_tenant_id(registry, args), args.name, args.version, operator())
    print(f"{args.name}: version {args.version} retired")
    return 0


def adapters_archive(registry: Registry, args: argparse.Namespace) -> int:
    registry.archive(_tenant_id(registry, args), args.name, args.version, operator())
    print(f"{args.name}: version {args.version} archived")
    return 0


def adapters_audit(registry: Registry, args: argparse.Namespace) -> int:
    tenant_id = _tenant_id(registry, args) if args.tenant else None
    prefix = None
    if args.name:
        prefix = f"adapter:{registry.get_tenant(tenant_ref(args.tenant)).name}/{args.name}"
    events = registry.audit_log(
        tenant_id=tenant_id, action=args.action, subject_prefix=prefix, limit=args.limit
    )
    rows = [
        [
            e.id,
            f"{e.created_at:%Y-%m-%d %H:%M:%S}",
            e.actor,
            e.action,
            e.subject,
            json.dumps(e.after, sort_keys=True) if e.after else None,
        ]
        for e in events
    ]
    print_table(["ID", "TIME", "ACTOR", "ACTION", "SUBJECT", "AFTER"], rows)
    return 0


# -- parser wiring -----------------------------------------------------------------------


def _command(group: Any, name: str, handler: Callable[..., int], help: str) -> Any:
    parser = group.add_parser(name, help=help)
    add_settings_flags(parser, REGISTRY_SETTINGS)
    parser.set_defaults(func=_registry_command(handler))
    return parser


def _limit_flags(parser: Any) -> None:
    for field, flag in LIMIT_FLAGS.items():
        parser.add_argument(
            flag,
            dest=field,
            type=int,
            default=None,
            help=f"{field.replace('_', ' ')} (omit: unlimited)",
        )


def _tenant_flag(parser: Any, required: bool = True) -> None:
    parser.add_argument("--tenant", required=required, help="tenant name or id")


def _add_tenants(sub: Any) -> None:
    group = sub.add_parser("tenants", help="create and list tenants, set their limits")
    commands = group.add_subparsers(dest="tenants_command", required=True, metavar="COMMAND")
    create = _command(commands, "create", tenants_create, "create a tenant")
    create.add_argument("name")
    _limit_flags(create)
    _command(commands, "list", tenants_list, "list tenants and their limits")
    limits = _command(commands, "limits", tenants_limits, "replace a tenant's limits")
    limits.add_argument("tenant", help="tenant name or id")
    _limit_flags(limits)
    _capture_flags(_command(commands, "capture", tenants_capture, CAPTURE_HELP))


CAPTURE_HELP = "show, or replace with --on/--off, a tenant's capture of chat completions"


def _capture_flags(parser: Any) -> None:
    parser.add_argument("tenant", help="tenant name or id")
    switch = parser.add_mutually_exclusive_group()
    switch.add_argument("--on", dest="on", action="store_true", default=None, help="capture")
    switch.add_argument(
        "--off", dest="on", action="store_false", default=None, help="store nothing"
    )
    parser.add_argument(
        "--store-by-default",
        action="store_true",
        help="store requests that do not say `store` (default: only `store: true`)",
    )
    parser.add_argument(
        "--retention-days",
        type=int,
        default=CaptureSettings.retention_days,
        help="delete records older than this (default: %(default)s)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=CaptureSettings.max_body_bytes,
        help="largest request or answer stored (default: %(default)s)",
    )


def _add_keys(sub: Any) -> None:
    group = sub.add_parser("keys", help="create, list and revoke API keys")
    commands = group.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    create = _command(commands, "create", keys_create, "create a key (printed once)")
    scope = create.add_mutually_exclusive_group(required=True)
    scope.add_argument("--tenant", help="tenant name or id (a tenant key)")
    scope.add_argument("--admin", action="store_true", help="an admin key")
    create.add_argument("--name", default="", help="a label for the key")
    revoke = _command(commands, "revoke", keys_revoke, "revoke a key")
    revoke.add_argument("key_id", type=int)
    _tenant_flag(_command(commands, "list", keys_list, "list keys"), required=False)


def _add_bases(sub: Any) -> None:
    group = sub.add_parser("bases", help="register, list and deprecate base models")
    commands = group.add_subparsers(dest="bases_command", required=True, metavar="COMMAND")
    register = _command(commands, "register", bases_register, "register a local HF model dir")
    register.add_argument("path")
    register.add_argument("--name", help="base name (default: the directory name)")
    register.add_argument("--revision", default="", help="revision label")
    _command(commands, "list", bases_list, "list base models")
    deprecate = _command(commands, "deprecate", bases_deprecate, "deprecate a base model")
    deprecate.add_argument("base", help="name, name@revision, revision or fingerprint")
    deprecate.add_argument("--reason", default="", help="why (shown to adapter owners)")


def _add_adapters(sub: Any) -> None:
    group = sub.add_parser("adapters", help="push adapters, manage versions and aliases")
    commands = group.add_subparsers(dest="adapters_command", required=True, metavar="COMMAND")
    push = _command(commands, "push", adapters_push, "upload a PEFT adapter dir or archive")
    push.add_argument("source", help="PEFT output directory, or a tar/zip of it")
    push.add_argument("--name", required=True, help="adapter name")
    push.add_argument("--base", required=True, help="base name, name@revision or fingerprint")
    push.add_argument("--description", default=None)
    _tenant_flag(push)
    _tenant_flag(_command(commands, "list", adapters_list, "list a tenant's adapters"))
    for name, handler, help in (
        ("show", adapters_show, "show an adapter's versions and aliases"),
        ("rollback", adapters_rollback, "restore the previous production version"),
    ):
        parser = _command(commands, name, handler, help)
        parser.add_argument("name")
        _tenant_flag(parser)
    for name, handler, help in (
        ("promote", adapters_promote, "point production at a version"),
        ("retire", adapters_retire, "retire a version (not while an alias points at it)"),
        ("archive", adapters_archive, "archive a version (not while an alias points at it)"),
    ):
        parser = _command(commands, name, handler, help)
        parser.add_argument("name")
        parser.add_argument("version", type=int)
        _tenant_flag(parser)
    commands.choices["promote"].add_argument(
        "--override", action="store_true", help="promote even if gates fail (recorded)"
    )
    canary = _command(commands, "canary", adapters_canary, "send a share of traffic to a version")
    canary.add_argument("name")
    canary.add_argument("version", type=int, nargs="?")
    canary.add_argument("--weight", type=float, default=0.1, help="share of traffic, 0..1")
    canary.add_argument("--clear", action="store_true", help="remove the canary alias")
    _tenant_flag(canary)
    audit = _command(commands, "audit", adapters_audit, "print the audit log")
    audit.add_argument("name", nargs="?", help="only this adapter (needs --tenant)")
    audit.add_argument("--action", help="only this action, e.g. adapter.promote")
    audit.add_argument("--limit", type=int, default=100, help="newest N events")
    _tenant_flag(audit, required=False)


def add_commands(subparsers: Any) -> None:
    """Register ``tenants``, ``keys``, ``bases`` and ``adapters`` on the ``loraplex`` parser."""
    _add_tenants(subparsers)
    _add_keys(subparsers)
    _add_bases(subparsers)
    _add_adapters(subparsers)
