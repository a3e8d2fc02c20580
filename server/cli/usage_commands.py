"""``loraplex usage [--tenant T]``: the usage counters as a table (or CSV), from a shell.

Every tenant's unless ``--tenant``; the last 30 days unless ``--since``/``--until`` (UTC
days, YYYY-MM-DD); ``--adapter NAME`` (``""``: the base model). The last line totals the
rows. The same report as ``GET /v1/usage`` and ``GET /admin/usage`` (``registry.usage``).
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from registry import Registry
from registry.usage import COLUMNS, SUMMED, UsageQuery, UsageReports, to_csv, totals
from server.cli.registry_commands import _command, _tenant_flag, _tenant_id, print_table


def usage(registry: Registry, args: argparse.Namespace) -> int:
    tenant_id = _tenant_id(registry, args) if args.tenant else None
    query = UsageQuery(tenant_id, args.since, args.until, args.adapter)
    lines = UsageReports(registry).lines(query)
    if args.csv:
        print(to_csv(lines), end="")
        return 0
    rows: list[list[Any]] = [[getattr(line, name) for name in COLUMNS] for line in lines]
    summed = totals(lines)
    since, until = query.days()
    rows.append(["total", f"{since}..{until}", "", "", *(summed[name] for name in SUMMED)])
    print_table([name.upper() for name in COLUMNS], rows)
    return 0


def add_commands(sub: Any) -> None:
    command = _command(sub, "usage", usage, "requests and tokens by day, tenant and adapter")
    command.add_argument("--since", type=dt.date.fromisoformat, help="first UTC day, YYYY-MM-DD")
    command.add_argument("--until", type=dt.date.fromisoformat, help="last UTC day, YYYY-MM-DD")
    command.add_argument("--adapter", help='only this adapter ("" for the base model)')
    command.add_argument("--csv", action="store_true", help="CSV with a header row")
    _tenant_flag(command, required=False)
