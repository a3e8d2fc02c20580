"""``loraplex erasures erase|list|show|retrain``: a tenant's erasures (``registry.erasures``).

Like the other registry commands these act directly on the registry the settings name,
as an admin operator (audited as ``cli:<user>``). ``erase`` deletes a file, a stored
completion or every record of one end user and prints what they had reached; ``retrain``
queues the jobs that retrain without them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any, cast

from registry import Registry
from registry.erasures import Erasure, ErasureStore, Kind, Subject
from registry.jobs import JobStore
from server.cli.registry_commands import _command, _tenant_flag, _tenant_id, operator, print_table


def _store(registry: Registry) -> ErasureStore:
    return ErasureStore(JobStore(registry))


def _utc(when: dt.datetime) -> dt.datetime:
    """``when`` as UTC (SQLite hands back naive datetimes; they were written in UTC)."""
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _print(record: Erasure) -> None:
    shown = {
        "id": record.id,
        "kind": record.kind,
        "subject": record.subject,
        "created_at": _utc(record.created_at).isoformat(),
        "created_by": record.created_by,
        "lineage": record.lineage,
        "retrain_jobs": record.retrain_jobs,
    }
    print(json.dumps(shown, indent=2))


def erasures_erase(registry: Registry, args: argparse.Namespace) -> int:
    given = [(k, getattr(args, k)) for k in ("user", "file", "completion") if getattr(args, k)]
    if len(given) != 1:
        raise SystemExit("loraplex erasures erase: give one of --user, --file or --completion")
    [(kind, value)] = given
    subject = Subject(cast(Kind, kind), value)
    record = _store(registry).erase(_tenant_id(registry, args), subject, operator())
    _print(record)
    if record.lineage.get("adapter_versions"):
        print(f"adapter versions were trained on it: `loraplex erasures retrain {record.id}`")
    return 0


def erasures_list(registry: Registry, args: argparse.Namespace) -> int:
    rows = [
        (e.id, e.created_at.isoformat(timespec="seconds"), e.kind, e.subject,
         e.lineage.get("examples"), len(e.lineage.get("adapter_versions", [])),
         ",".join(e.retrain_jobs) or None)
        for e in _store(registry).list_erasures(_tenant_id(registry, args))
    ]  # fmt: skip
    print_table(["ID", "TIME", "KIND", "SUBJECT", "EXAMPLES", "ADAPTER_VERSIONS", "JOBS"], rows)
    return 0


def erasures_show(registry: Registry, args: argparse.Namespace) -> int:
    _print(_store(registry).get(_tenant_id(registry, args), args.erasure))
    return 0


def erasures_retrain(registry: Registry, args: argparse.Namespace) -> int:
    jobs = _store(registry).retrain(_tenant_id(registry, args), args.erasure, operator())
    for job in jobs:
        print(f"queued {job.id} for {job.adapter_name} on {job.training_file}")
    if not jobs:
        print("nothing trained on the erased data: no job queued")
    return 0


def add_commands(sub: Any) -> None:
    """Add ``erasures`` to the ``loraplex`` subcommands."""
    group = sub.add_parser("erasures", help="erase files, completions or a user's records")
    commands = group.add_subparsers(dest="erasures_command", required=True, metavar="COMMAND")
    erase = _command(commands, "erase", erasures_erase, "erase one subject; print its lineage")
    erase.add_argument("--user", help="every record of this end user (the requests' `user`)")
    erase.add_argument("--file", help="an uploaded file's id")
    erase.add_argument("--completion", help="a stored completion's id")
    listed = _command(commands, "list", erasures_list, "list the tenant's erasures")
    show = _command(commands, "show", erasures_show, "show one erasure and its lineage")
    show.add_argument("erasure")
    retrain = _command(commands, "retrain", erasures_retrain, "retrain without the erased data")
    retrain.add_argument("erasure")
    for parser in (erase, listed, show, retrain):
        _tenant_flag(parser)
