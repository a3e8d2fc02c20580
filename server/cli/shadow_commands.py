"""``loraplex adapters shadow NAME --tenant T``: an adapter's shadow traffic, from a shell.

- ``shadow NAME VERSION --share 0.2``: copy that share of production's requests to VERSION
  (its answers are compared with production's, never returned);
- ``shadow NAME``: the shadow alias and its results against the current production version;
- ``shadow NAME --record [VERSION]``: record those results as the version's eval results
  (suite ``shadow``: ``agreement``, ``json_valid``), for promotion gates;
- ``shadow NAME --clear``: stop the copies (the results stay).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from registry import Registry
from registry.shadow import ShadowStatus, ShadowStore
from server.cli.registry_commands import _command, _tenant_flag, _tenant_id, operator


def adapters_shadow(registry: Registry, args: argparse.Namespace) -> int:
    store, tenant_id = ShadowStore(registry), _tenant_id(registry, args)
    if args.clear:
        registry.clear_shadow(tenant_id, args.name, operator())
        print(f"{args.name}: shadow cleared")
        return 0
    if args.record:
        for result in store.record_eval(tenant_id, args.name, args.version, operator()):
            samples = f" ({result.sample_count} copies)" if result.sample_count else ""
            print(f"{args.name}: {result.suite}/{result.metric} = {result.value:.3f}{samples}")
        return 0
    if args.version is not None:
        registry.set_shadow(tenant_id, args.name, args.version, args.share, operator())
    status = store.status(tenant_id, args.name)
    if args.json:
        print(json.dumps(status.to_json(), indent=2))
        return 0
    for label, value in _lines(status):
        print(f"{label:<11} {value}")
    return 0


def _lines(status: ShadowStatus) -> list[tuple[str, str]]:
    if status.version is None:
        return [("adapter", status.adapter), ("shadow", "none (set one: shadow NAME VERSION)")]
    share = status.share or 0.0
    lines = [
        ("adapter", status.adapter),
        ("shadow", f"v{status.version}, {share:.0%} of production's requests"),
        ("production", f"v{status.production}" if status.production else "none"),
    ]
    results = status.to_json()["results"]
    if not results["compared"]:
        return [*lines, ("compared", "0 copies yet")]
    agreement = f"{results['agreed']} of {results['compared']} ({results['agreement']:.1%})"
    lines.append(("agreement", agreement))
    if results["json_checked"]:
        valid = results["json_valid"]
        checked = f"{results['json_passed']} of {results['json_checked']} ({valid:.1%})"
        lines.append(("json_valid", checked))
    lines.append(("failed", str(results["failed"])))
    tokens = f"{results['prompt_tokens']} prompt, {results['completion_tokens']} completion"
    return [*lines, ("tokens", tokens)]


def add_commands(sub: Any) -> None:
    """Add ``shadow`` to the ``adapters`` group (``registry_commands`` makes the group)."""
    adapters = sub.choices["adapters"]
    group = next(a for a in adapters._actions if isinstance(a, argparse._SubParsersAction))
    shadow = _command(group, "shadow", adapters_shadow, "copy production's traffic to a version")
    shadow.add_argument("name")
    shadow.add_argument("version", type=int, nargs="?", help="the candidate (set or --record)")
    shadow.add_argument(
        "--share", type=float, default=0.1, help="share of production's requests copied, (0, 1]"
    )
    shadow.add_argument("--clear", action="store_true", help="stop the copies")
    shadow.add_argument(
        "--record", action="store_true", help="record the results as eval results (suite shadow)"
    )
    shadow.add_argument("--json", action="store_true", help="print the status as JSON")
    _tenant_flag(shadow)
