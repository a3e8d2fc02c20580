"""``loraplex retraining set|show|delete|run-now``: a tenant's retraining policies.

Like the other registry commands these act directly on the registry the settings name,
as an admin operator (audited as ``cli:<user>``). ``run-now`` runs a policy at once,
whatever its trigger says, and prints the job it queued or why it queued none.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from registry import Registry
from registry.jobs import JobStore
from registry.retraining import NamedPolicy, PolicySpec, RetrainingStore, policy_settings
from server.cli.registry_commands import _command, _tenant_flag, _tenant_id, operator, print_table
from server.cli.worker_commands import _parse_set


def _store(registry: Registry) -> RetrainingStore:
    return RetrainingStore(JobStore(registry))


def _print(policy: NamedPolicy) -> None:
    row = policy.row
    shown = {
        "adapter": policy.adapter,
        "dataset": policy.dataset,
        **policy_settings(row),
        "next_run_at": row.next_run_at.isoformat() if row.next_run_at else None,
        "last_run_at": row.last_run_at.isoformat() if row.last_run_at else None,
        "last_job": row.last_job,
        "last_dataset_version": policy.last_dataset_version,
        "last_outcome": row.last_outcome or None,
    }
    print(json.dumps(shown, indent=2))


def retraining_set(registry: Registry, args: argparse.Namespace) -> int:
    from training.config import ConfigError, TrainConfig
    from training.hyperparameters import train_config

    schema = json.loads(Path(args.schema).read_text()) if args.schema else None
    hyperparameters = _parse_set(args.set)
    try:  # checked as a job's would be, so no run fails on them later
        train_config(TrainConfig(), args.method, args.seed, hyperparameters)
    except ConfigError as exc:
        print(f"loraplex retraining set: {exc}", file=sys.stderr)
        return 1
    spec = PolicySpec(
        dataset=args.dataset,
        every_seconds=args.every,
        after_feedback=args.after_feedback,
        start_from=args.start_from,
        method=args.method,
        seed=args.seed,
        hyperparameters=hyperparameters,
        json_schema=schema,
        enabled=not args.disabled,
    )
    tenant_id = _tenant_id(registry, args)
    _print(_store(registry).set_policy(tenant_id, args.adapter, spec, operator()))
    return 0


def retraining_show(registry: Registry, args: argparse.Namespace) -> int:
    store, tenant_id = _store(registry), _tenant_id(registry, args)
    if args.adapter is not None:
        _print(store.get_policy(tenant_id, args.adapter))
        return 0
    rows = [
        (p.adapter, p.dataset, p.row.every_seconds, p.row.after_feedback, p.row.start_from,
         p.row.enabled, p.row.last_job, p.row.last_outcome or None)
        for p in store.list_policies(tenant_id)
    ]  # fmt: skip
    print_table(
        ["adapter", "dataset", "every_s", "after_feedback", "start", "enabled", "last_job",
         "last_outcome"], rows,
    )  # fmt: skip
    return 0


def retraining_delete(registry: Registry, args: argparse.Namespace) -> int:
    _store(registry).delete_policy(_tenant_id(registry, args), args.adapter, operator())
    print(f"deleted the retraining policy of {args.adapter}")
    return 0


def retraining_run_now(registry: Registry, args: argparse.Namespace) -> int:
    store = _store(registry)
    outcome = store.run_claimed(store.claim_now(_tenant_id(registry, args), args.adapter))
    print(outcome.message)
    return 0 if outcome.job is not None or outcome.message.startswith("Skipped") else 1


def _set_flags(parser: Any) -> None:
    parser.add_argument("adapter", help="the adapter the policy retrains")
    parser.add_argument("--dataset", required=True, help="dataset the jobs train on")
    parser.add_argument("--every", type=int, help="run every this many seconds")
    parser.add_argument("--after-feedback", type=int, help="run after N new feedback items")
    parser.add_argument("--start-from", choices=["production", "scratch"], default="production")
    parser.add_argument("--method", choices=["supervised", "dpo"], default="supervised")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schema", help="JSON schema file the answers must follow")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="a hyperparameter"
    )
    parser.add_argument("--disabled", action="store_true", help="store it without running it")


def add_commands(sub: Any) -> None:
    """Add ``retraining`` to the ``loraplex`` subcommands."""
    group = sub.add_parser("retraining", help="set, show, delete or run retraining policies")
    commands = group.add_subparsers(dest="retraining_command", required=True, metavar="COMMAND")
    set_ = _command(commands, "set", retraining_set, "create or replace an adapter's policy")
    _set_flags(set_)
    show = _command(commands, "show", retraining_show, "show one policy, or list them")
    show.add_argument("adapter", nargs="?", help="the adapter (omit: list every policy)")
    delete = _command(commands, "delete", retraining_delete, "delete an adapter's policy")
    delete.add_argument("adapter")
    run_now = _command(commands, "run-now", retraining_run_now, "run an adapter's policy now")
    run_now.add_argument("adapter")
    for parser in (set_, show, delete, run_now):
        _tenant_flag(parser)
