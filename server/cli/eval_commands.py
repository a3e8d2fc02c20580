"""``loraplex adapters evals NAME``: an adapter's evaluation over its versions.

A table with one row per version (and the aliases pointing at it) and one column per
suite/metric, each cell the latest value ('-' where a version has none); ``--json``
prints the same as the REST route does. ``--online VERSION`` first records that
version's online metrics (feedback, errors, latency) from capture and the usage book.
Like the other registry commands it acts on the registry directly, as an admin operator
(audited as ``cli:<user>``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

from registry import Registry
from registry.eval_history import VersionEvals, eval_history
from registry.online_metrics import record_online_metrics
from server.cli.registry_commands import _command, _tenant_flag, _tenant_id, operator, print_table


def adapters_evals(registry: Registry, args: argparse.Namespace) -> int:
    tenant_id = _tenant_id(registry, args)
    if args.online is not None:
        since = dt.datetime.combine(args.since, dt.time(), dt.UTC) if args.since else None
        measured = record_online_metrics(
            registry, tenant_id, args.name, args.online, operator(), since=since
        )
        if not measured.scores:
            print(f"version {args.online}: no traffic or feedback yet; nothing recorded")
    history = eval_history(registry, tenant_id, args.name)
    if args.json:
        print(json.dumps({"object": "list", "data": [v.to_json() for v in history]}, indent=2))
        return 0
    headers, rows = evals_table(history)
    print_table(headers, rows)
    return 0


def evals_table(history: list[VersionEvals]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows: a row per version, a column per suite/metric any version has."""
    columns = sorted({(r.suite, r.metric) for v in history for r in v.latest})
    rows = []
    for v in history:
        values = {(r.suite, r.metric): r.value for r in v.latest}
        cells = [_cell(values.get(column)) for column in columns]
        rows.append([v.version, ",".join(v.aliases) or None, *cells])
    return ["VERSION", "ALIASES", *(f"{s}/{m}" for s, m in columns)], rows


def _cell(value: float | None) -> str | None:
    return None if value is None else f"{value:.4g}"


def add_commands(sub: Any) -> None:
    """Add ``evals`` to the ``adapters`` group (``registry_commands`` makes the group)."""
    adapters = sub.choices["adapters"]
    group = next(a for a in adapters._actions if isinstance(a, argparse._SubParsersAction))
    evals = _command(group, "evals", adapters_evals, "show eval results over versions")
    evals.add_argument("name")
    evals.add_argument("--json", action="store_true", help="print JSON, as the REST route")
    evals.add_argument(
        "--online",
        type=int,
        metavar="VERSION",
        help="first record this version's online metrics (feedback, errors, latency)",
    )
    evals.add_argument(
        "--since",
        type=dt.date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="with --online: traffic from this UTC day on (default: the version's whole life)",
    )
    _tenant_flag(evals)
