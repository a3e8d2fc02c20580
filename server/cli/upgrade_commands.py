"""``loraplex bases upgrade OLD NEW`` and ``loraplex bases upgrades``: base upgrades
(``registry.upgrades``) from a shell, on the registry directly, as an admin operator.

- ``bases upgrade OLD NEW --dry-run``: the plan, as a table (writes nothing);
- ``bases upgrade OLD NEW [--deadline ...] [--uploaded-past-deadline retire|keep] ...``:
  start it and print its id (the workers advance it every few seconds);
- ``bases upgrades``: every upgrade; ``bases upgrades ID``: its per-adapter state table
  (``--json``: the API's object); ``--advance``: take the steps possible now and print them;
  ``--follow``: advance until it ends, printing each transition; ``--cancel``: stop it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from typing import Any

from registry import InvalidRequest, Registry
from registry.upgrades import (
    FINAL,
    RUNNING,
    UpgradeOptions,
    UpgradeStore,
    UpgradeTransition,
    UpgradeView,
)
from server.cli.registry_commands import _command, operator, print_table

_DEFAULTS = UpgradeOptions()


def bases_upgrade(registry: Registry, args: argparse.Namespace) -> int:
    store = UpgradeStore(registry)
    if args.dry_run:
        plan = store.plan(args.old, args.new)
        print(f"plan: upgrade {plan.old} -> {plan.new}, {len(plan.items)} adapter(s) (dry run)")
        rows = [
            [i.tenant, i.adapter, i.version, i.kind, i.source, i.method,
             ",".join(i.suites) or None, ",".join(i.gates) or None]
            for i in plan.items
        ]  # fmt: skip
        headers = ["TENANT", "ADAPTER", "VERSION", "KIND", "RETRAIN_FROM", "METHOD", "SUITES"]
        print_table([*headers, "GATES"], rows)
        return 0
    options = UpgradeOptions(
        deadline=_deadline(args.deadline),
        uploaded_past_deadline=args.uploaded_past_deadline,
        unanswered_past_deadline=args.unanswered_past_deadline,
        canary_weight=args.canary_weight,
        canary_seconds=args.canary_seconds,
        bar_margin=args.bar_margin,
        retire_grace_seconds=args.retire_grace_seconds,
    )
    view = store.start(args.old, args.new, options, operator())
    print(f"started {view.row.id}: {view.old} -> {view.new}, {len(view.items)} adapter(s), "
          f"deadline {view.row.options['deadline']}")  # fmt: skip
    print(f"follow it: loraplex bases upgrades {view.row.id} --follow")
    return 0


def _deadline(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(
            f"--deadline {text!r} is not an ISO datetime; write e.g. 2027-01-31T00:00:00Z"
        ) from None


def bases_upgrades(registry: Registry, args: argparse.Namespace) -> int:
    store = UpgradeStore(registry)
    if args.id is None and (args.advance or args.follow or args.cancel):
        raise InvalidRequest("--advance, --follow and --cancel need an upgrade id (upg_...)")
    if args.id is None:
        rows = [
            [v.row.id, v.old, v.new, v.row.state,
             f"{sum(i.state in FINAL for i, _ in v.items)}/{len(v.items)}",
             v.row.created_at.strftime("%Y-%m-%d %H:%M")]
            for v in store.list_upgrades()
        ]  # fmt: skip
        print_table(["ID", "OLD", "NEW", "STATE", "FINAL", "CREATED"], rows)
        return 0
    if args.cancel:
        _show(store.cancel(args.id, operator()), args.json)
        return 0
    if args.follow:
        return _follow(store, args.id, args.interval)
    if args.advance:
        _print_transitions(store.advance(args.id))
    _show(store.get(args.id), args.json)
    return 0


def _follow(store: UpgradeStore, upgrade_id: str, interval: float) -> int:
    """Advance until the upgrade ends, printing each transition as it happens."""
    while True:
        _print_transitions(store.advance(upgrade_id))
        view = store.get(upgrade_id)
        if view.row.state != RUNNING:
            _show(view, False)
            return 0
        time.sleep(interval)


def _print_transitions(moved: list[UpgradeTransition]) -> None:
    for step in moved:
        who = "upgrade" if step.adapter is None else f"{step.tenant}/{step.adapter}"
        print(f"{dt.datetime.now(dt.UTC):%H:%M:%S}  {who}: {step.state}  {step.message}",
              flush=True)  # fmt: skip


def _show(view: UpgradeView, as_json: bool) -> None:
    if as_json:
        print(json.dumps(view.to_json(), indent=2))
        return
    progress = view.to_json()["progress"]
    print(f"{view.row.id}  {view.old} -> {view.new}  {view.row.state}  "
          f"{progress['final']}/{progress['total']} final  "
          f"deadline {view.row.options.get('deadline')}")  # fmt: skip
    rows = [_item_row(item, tenant) for item, tenant in view.items]
    print_table(["TENANT", "ADAPTER", "OLD", "KIND", "STATE", "NEW", "SCORES", "NOTE"], rows)
    report = view.row.report
    if report is not None:
        left = report.get("left_on_old_base") or []
        print(f"left on {view.old}: {', '.join(left) if left else 'nothing'}")


def _item_row(item: Any, tenant: str) -> list[Any]:
    scores = item.scores or {}
    shown = ", ".join(
        f"{name} {scores[name]:.3g}"
        for name in ("old", "base", "new")
        if isinstance(scores.get(name), int | float)
    )
    new = None if item.new_version is None else f"v{item.new_version}"
    metric = f"{item.metric}: " if item.metric and shown else ""
    return [tenant, item.adapter, f"v{item.old_version}", item.kind, item.state, new,
            f"{metric}{shown}" or None, item.note or None]  # fmt: skip


def _bases_group(sub: Any) -> Any:
    bases = sub.choices["bases"]
    return next(a for a in bases._actions if isinstance(a, argparse._SubParsersAction))


def add_commands(sub: Any) -> None:
    """Add ``upgrade`` and ``upgrades`` to the ``bases`` group (``registry_commands``)."""
    group = _bases_group(sub)
    upgrade = _command(group, "upgrade", bases_upgrade, "move every adapter to a new base")
    upgrade.add_argument("old", help="the base to leave (name, name@revision or fingerprint)")
    upgrade.add_argument("new", help="the base to move to")
    upgrade.add_argument("--dry-run", action="store_true", help="print the plan only")
    upgrade.add_argument("--deadline", help="owners act by then (ISO, UTC; default +14 days)")
    upgrade.add_argument(
        "--uploaded-past-deadline", choices=("retire", "keep"),
        default=_DEFAULTS.uploaded_past_deadline,
        help="uploaded adapters past the deadline (default: %(default)s)",
    )  # fmt: skip
    upgrade.add_argument(
        "--unanswered-past-deadline", choices=("retrain", "retire"),
        default=_DEFAULTS.unanswered_past_deadline,
        help="an owner's choice not made by the deadline (default: %(default)s)",
    )  # fmt: skip
    upgrade.add_argument("--canary-weight", type=float, default=_DEFAULTS.canary_weight)
    upgrade.add_argument(
        "--canary-seconds", type=float, default=_DEFAULTS.canary_seconds,
        help="how long a retrained version's canary runs before promotion",
    )  # fmt: skip
    upgrade.add_argument("--bar-margin", type=float, default=_DEFAULTS.bar_margin)
    upgrade.add_argument(
        "--retire-grace-seconds", type=float, default=_DEFAULTS.retire_grace_seconds,
        help="how long the old version stays active after the promotion",
    )  # fmt: skip
    upgrades = _command(group, "upgrades", bases_upgrades, "list, follow or cancel upgrades")
    upgrades.add_argument("id", nargs="?", help="one upgrade (upg_...)")
    action = upgrades.add_mutually_exclusive_group()
    action.add_argument("--advance", action="store_true", help="take the steps possible now")
    action.add_argument("--follow", action="store_true", help="advance until it ends")
    action.add_argument("--cancel", action="store_true", help="stop it")
    upgrades.add_argument("--interval", type=float, default=5.0, help="seconds between steps")
    upgrades.add_argument("--json", action="store_true", help="print the upgrade as JSON")
