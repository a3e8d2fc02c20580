"""``loraplex adapters drift NAME --tenant T``: an adapter's prompt drift, from a shell.

Reads the registry the settings name, like the other registry commands, and prints the
drift score of the last ``--days`` (0: live prompts like the production version's training
prompts; 1: nothing alike), the threshold (``LORAPLEX_DRIFT_THRESHOLD``, or
``--drift-threshold``), whether the score is past it, the prompt counts behind it, and the
gateways' last check: drifting since when (the ``adapter.drift`` event), or within it.
Unknown drift (no reference, too few prompts) prints why.
"""

from __future__ import annotations

import argparse
from typing import Any

from registry import Registry
from registry.drift import DEFAULT_DAYS, DriftReport, DriftState, DriftStore
from server.cli.registry_commands import _command, _tenant_flag, _tenant_id
from server.config import add_settings_flags, load_settings


def adapters_drift(registry: Registry, args: argparse.Namespace) -> int:
    store, tenant_id = DriftStore(registry), _tenant_id(registry, args)
    threshold = load_settings(vars(args)).drift_threshold
    report = store.report(tenant_id, args.name, args.days, threshold)
    for label, value in _lines(report, store.state(tenant_id, args.name)):
        print(f"{label:<10} {value}")
    return 0


def _lines(report: DriftReport, state: DriftState | None) -> list[tuple[str, str]]:
    if report.score is None:
        score = f"unknown (threshold {report.threshold:g})"
    else:
        side = "past" if report.over else "within"
        score = f"{report.score:.3f} ({side} the threshold {report.threshold:g})"
    lines = [("adapter", report.adapter), ("score", score), ("state", _state(state))]
    if report.version is not None:
        reference = report.reference_prompts
        known = f"{reference} prompts" if reference is not None else "none"
        lines.append(("version", f"production v{report.version} (reference: {known})"))
    lines.append(("live", f"{report.live_prompts} prompts in the last {report.days} days"))
    if report.lengths is not None and report.ngrams is not None:
        lines.append(("distances", f"lengths {report.lengths:.3f}, n-grams {report.ngrams:.3f}"))
    if report.reason:
        lines.append(("reason", report.reason))
    return lines


def _state(state: DriftState | None) -> str:
    """What the gateways' checks (and their events) last said."""
    if state is None:
        return "not checked yet (no gateway has seen its traffic)"
    if not state.over:
        return "within the threshold"
    since = state.changed_at  # set whenever ``over`` is
    return f"drifting since {since:%Y-%m-%d %H:%M:%S} UTC" if since else "drifting"


def add_commands(sub: Any) -> None:
    """Add ``drift`` to the ``adapters`` group (``registry_commands`` makes the group)."""
    adapters = sub.choices["adapters"]
    group = next(a for a in adapters._actions if isinstance(a, argparse._SubParsersAction))
    drift = _command(group, "drift", adapters_drift, "show an adapter's prompt drift")
    drift.add_argument("name")
    drift.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help="live prompts of the last N days"
    )
    add_settings_flags(drift, ["drift_threshold"])
    _tenant_flag(drift)
