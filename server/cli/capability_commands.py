"""``loraplex bases capability set|show`` and ``loraplex adapters gates``.

``bases capability set BASE NAME FILE.jsonl`` registers (or replaces, clearing the base's
reference) a capability suite from a JSONL file, one ``{"prompt": ..., "answer": ...}``
per line; ``show`` prints it with the base's reference scores. ``adapters gates NAME``
prints an adapter's promotion gates, ``--set FILE.json`` replaces them from a JSON list
of gates (the REST body's ``gates``: ``suite``, ``metric``, ``min_value``,
``max_regression``, ``higher_is_better``, ``max_below_base``), ``--clear`` removes them.
Like the other registry commands these act on the registry directly, as an admin operator.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from registry import Gate, Registry
from registry.capability import CapabilityStore
from server.cli.registry_commands import _command, _tenant_flag, _tenant_id, operator, print_table


class FileError(ValueError):
    """A suite or gates file that cannot be read; the message names the line."""


def read_examples(path: Path) -> list[Any]:
    """The JSONL file's records, in order (blank lines skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FileError(f"cannot read {path}: {exc}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise FileError(f"{path} line {number} is not JSON: {exc.msg}") from None
    return records


def capability_set(registry: Registry, args: argparse.Namespace) -> int:
    try:
        examples = read_examples(Path(args.file))
    except FileError as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 1
    base = registry.get_base(args.base)
    suite = CapabilityStore(registry).set_suite(base, args.name, examples, operator())
    print(
        f"capability suite {suite.name} of base {base.name}@{base.revision}: "
        f"{len(suite.examples)} examples (eval suite {suite.label}); the next fine-tuning "
        "job on this base measures the base's reference"
    )
    return 0


def capability_show(registry: Registry, args: argparse.Namespace) -> int:
    base = registry.get_base(args.base)
    suite = CapabilityStore(registry).get_suite(base, args.name)
    print(f"suite:     {suite.name} (eval suite {suite.label})")
    print(f"base:      {base.name}@{base.revision}")
    print(f"examples:  {len(suite.examples)} (sha256 {suite.examples_sha256[:16]})")
    print(f"set by:    {suite.created_by} at {suite.created_at.isoformat()}")
    reference = suite.reference
    if reference is None:
        print("reference: not measured yet (the next fine-tuning job on this base measures it)")
        return 0
    print(f"reference: {reference.sample_count} examples, by {reference.created_by} at "
          f"{reference.created_at.isoformat()}")  # fmt: skip
    print_table(["METRIC", "BASE"], [[k, f"{v:g}"] for k, v in sorted(reference.metrics.items())])
    return 0


def read_gates(path: Path) -> list[Gate]:
    """Gates from a JSON list (or ``{"gates": [...]}``); ``FileError`` names what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileError(f"cannot read gates from {path}: {exc}") from None
    items = data.get("gates") if isinstance(data, dict) else data
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise FileError(f"{path} must hold a JSON list of gate objects")
    known = {f.name for f in fields(Gate)}
    for number, item in enumerate(items, start=1):
        unknown = sorted(set(item) - known)
        missing = sorted({"suite", "metric"} - set(item))
        if unknown or missing:
            raise FileError(
                f"gate {number} in {path}: unknown {unknown or 'none'}, missing {missing or 'none'}"
                f" (fields: {', '.join(sorted(known))})"
            )
    return [Gate(**item) for item in items]


def adapters_gates(registry: Registry, args: argparse.Namespace) -> int:
    tenant_id = _tenant_id(registry, args)
    if args.set is not None or args.clear:
        try:
            gates = [] if args.clear else read_gates(Path(args.set))
        except FileError as exc:
            print(f"loraplex: {exc}", file=sys.stderr)
            return 1
        registry.set_gates(tenant_id, args.name, gates, operator())
    rows = [
        [g.suite, g.metric, g.min_value, g.max_regression, g.max_below_base,
         "higher" if g.higher_is_better else "lower"]
        for g in registry.get_gates(tenant_id, args.name)
    ]  # fmt: skip
    print_table(["SUITE", "METRIC", "MIN", "MAX_REGRESSION", "MAX_BELOW_BASE", "BETTER"], rows)
    return 0


def _commands_of(sub: Any, name: str) -> Any:
    """The subcommands of the ``name`` group (``registry_commands`` makes the group)."""
    parser = sub.choices[name]
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def add_commands(sub: Any) -> None:
    """Add ``capability set|show`` to ``loraplex bases`` and ``gates`` to ``adapters``."""
    add_capability_commands(_commands_of(sub, "bases"))
    add_gates_command(_commands_of(sub, "adapters"))


def add_capability_commands(bases: Any) -> None:
    """``capability set|show`` under ``loraplex bases``."""
    group = bases.add_parser("capability", help="a base's capability regression suites")
    commands = group.add_subparsers(dest="capability_command", required=True, metavar="COMMAND")
    put = _command(commands, "set", capability_set, "register or replace a suite (JSONL file)")
    show = _command(commands, "show", capability_show, "show a suite and the base's reference")
    for parser in (put, show):
        parser.add_argument("base", help="name, name@revision, revision or fingerprint")
        parser.add_argument("name", help="suite name (letters, digits, '.', '_', '-')")
    put.add_argument("file", help='JSONL: one {"prompt": ..., "answer": ...} per line')


def add_gates_command(adapters: Any) -> None:
    """``gates`` under ``loraplex adapters``."""
    parser = _command(adapters, "gates", adapters_gates, "show or replace promotion gates")
    parser.add_argument("name")
    _tenant_flag(parser)
    change = parser.add_mutually_exclusive_group()
    change.add_argument("--set", metavar="FILE.json", help="replace them with this JSON list")
    change.add_argument("--clear", action="store_true", help="remove every gate")
