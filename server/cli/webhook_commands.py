"""``loraplex webhooks ...`` and ``loraplex events``: a tenant's webhook subscriptions and
the lifecycle event log, from a shell, on the registry the settings name.

``webhooks create URL --tenant T [--events a,b]`` checks the URL with the same SSRF guard
as the REST API (``--webhook-allow`` / ``LORAPLEX_WEBHOOK_ALLOW`` admit more) and prints
the signing secret, the only time it is shown; ``rotate`` prints the new one. ``list``,
``delete``, ``deliveries`` (the delivery log) and ``redeliver`` (a dead delivery) take
the subscription's id. ``events [--tenant T] [--after ID]`` prints the event log, a
tenant's (with the platform's) or everyone's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from registry import Registry
from registry.events import EventLog
from registry.webhooks import DEFAULT_GRACE, STATES, WebhookStore, delivery_json
from server.cli.registry_commands import _command, _tenant_flag, _tenant_id, print_table
from server.config import add_settings_flags, load_settings
from server.webhooks.ssrf import Guard, TargetRefused


def _store(registry: Registry, args: argparse.Namespace) -> WebhookStore:
    return WebhookStore(registry, load_settings(vars(args)).webhook_max_per_tenant)


def webhooks_create(registry: Registry, args: argparse.Namespace) -> int:
    try:
        Guard(load_settings(vars(args)).webhook_allow).check(args.url)
    except TargetRefused as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 1
    events = [e.strip() for e in args.events.split(",") if e.strip()] if args.events else []
    sub = _store(registry, args).create(_tenant_id(registry, args), args.url, events,
                                        args.description)  # fmt: skip
    print(f"webhook  {sub.id}\nurl      {sub.url}\nevents   {', '.join(events) or 'all'}")
    print(f"secret   {sub.secret}   (shown only now: keep it to verify signatures)")
    return 0


def webhooks_list(registry: Registry, args: argparse.Namespace) -> int:
    subs = _store(registry, args).subscriptions(_tenant_id(registry, args))
    rows = [(s.id, s.url, ",".join(s.event_types) or "all", f"{s.created_at:%Y-%m-%d %H:%M}")
            for s in subs]  # fmt: skip
    print_table(["ID", "URL", "EVENTS", "CREATED"], rows)
    return 0


def webhooks_delete(registry: Registry, args: argparse.Namespace) -> int:
    _store(registry, args).delete(_tenant_id(registry, args), args.id)
    print(f"deleted webhook {args.id} and its delivery log")
    return 0


def webhooks_rotate(registry: Registry, args: argparse.Namespace) -> int:
    grace = dt.timedelta(hours=args.grace_hours)
    sub = _store(registry, args).rotate(_tenant_id(registry, args), args.id, grace)
    print(f"secret   {sub.secret}   (shown only now)")
    print(f"the previous secret signs beside it until {sub.previous_expires_at:%Y-%m-%d %H:%M} UTC")
    return 0


def webhooks_deliveries(registry: Registry, args: argparse.Namespace) -> int:
    rows = _store(registry, args).deliveries(_tenant_id(registry, args), args.id, args.state)
    shown = [delivery_json(r) for r in rows]
    if args.json:
        print(json.dumps(shown, indent=2))
        return 0
    table = [
        (d["id"], d["event_id"], d["state"], d["attempts"], d["last_status"] or d["last_error"],
         _when(d["next_attempt_at"]))
        for d in shown
    ]  # fmt: skip
    print_table(["DELIVERY", "EVENT", "STATE", "ATTEMPTS", "LAST", "NEXT ATTEMPT"], table)
    return 0


def webhooks_redeliver(registry: Registry, args: argparse.Namespace) -> int:
    row = _store(registry, args).redeliver(_tenant_id(registry, args), args.id, args.delivery)
    print(f"delivery {row.id} is pending again, due now")
    return 0


def events_list(registry: Registry, args: argparse.Namespace) -> int:
    tenant_id = _tenant_id(registry, args) if args.tenant else None
    events = [e.to_json() for e in EventLog(registry).read(tenant_id, args.after, args.limit)]
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    rows = [(e["id"], _when(e["created_at"]), e["tenant"], e["type"], e["data"]["subject"])
            for e in events]  # fmt: skip
    print_table(["ID", "TIME", "TENANT", "TYPE", "SUBJECT"], rows)
    return 0


def _when(unix: int | None) -> str | None:
    return None if unix is None else f"{dt.datetime.fromtimestamp(unix, dt.UTC):%Y-%m-%d %H:%M:%S}"


def add_commands(sub: Any) -> None:
    """Add the ``webhooks`` group and ``events``."""
    group = sub.add_parser("webhooks", help="a tenant's webhook subscriptions and deliveries")
    commands = group.add_subparsers(dest="webhooks_command", required=True, metavar="COMMAND")
    create = _command(commands, "create", webhooks_create, "subscribe a URL to events")
    create.add_argument("url")
    create.add_argument("--events", help="comma-separated event types (default: all)")
    create.add_argument("--description", default="")
    add_settings_flags(create, ["webhook_allow", "webhook_max_per_tenant"])
    _tenant_flag(create)
    _tenant_flag(_command(commands, "list", webhooks_list, "list a tenant's webhooks"))
    for name, handler, about in (
        ("delete", webhooks_delete, "delete a webhook and its delivery log"),
        ("rotate", webhooks_rotate, "replace a webhook's signing secret"),
        ("deliveries", webhooks_deliveries, "show a webhook's delivery log"),
        ("redeliver", webhooks_redeliver, "send a dead delivery again"),
    ):
        command = _command(commands, name, handler, about)
        command.add_argument("id", help="the webhook's id (wh_...)")
        _tenant_flag(command)
        if name == "rotate":
            hours = DEFAULT_GRACE.total_seconds() / 3600
            command.add_argument("--grace-hours", type=float, default=hours,
                                 help="hours the old secret keeps signing")  # fmt: skip
        elif name == "deliveries":
            command.add_argument("--state", choices=STATES)
            command.add_argument("--json", action="store_true")
        elif name == "redeliver":
            command.add_argument("delivery", help="the delivery's id (msg_...)")
    events = _command(sub, "events", events_list, "print the lifecycle event log")
    _tenant_flag(events, required=False)
    events.add_argument("--after", type=int, default=0, help="events with ids above this one")
    events.add_argument("--limit", type=int, default=100)
    events.add_argument("--json", action="store_true")
