"""``loraplex routed-models ... --tenant T``: a tenant's routed models, from a shell.

A routed model is one model name in front of several of the tenant's adapters (or bases);
its live version's routing policy picks one per request (``router.content``). Commands:

- ``list`` / ``show NAME``: the routed models, a routed model's versions (the live one
  marked), its gates and each version's latest routing evals; ``--json`` on both;
- ``save NAME --policy FILE.json [--description D] [--promote]``: the policy is checked
  here (every problem printed, exit 2, nothing written) and then by the registry (its
  references must be the tenant's adapters or bases); a new routed model's first version
  goes live at once, later ones with ``--promote`` or ``promote``;
- ``promote NAME VERSION [--override]``, ``rollback NAME``, ``delete NAME``;
- ``gates NAME [--suite S] [--min-accuracy X] [--max-regression Y] [--clear]``: show, set
  one suite's gate (the other suites' stay), or remove gates;
- ``eval NAME VERSION --suite-file FILE.jsonl [--suite S]``: route each labelled example
  with the version's rules and default, record the accuracy and confusion matrix;
- ``evals NAME [--json]``: every routing eval, oldest first.

Like the other registry commands these act on the registry directly, as an admin
operator (audited as ``cli:<user>``); registry refusals print their message and exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import router
from registry import Registry, RoutedModelInfo, RoutedModelStore, RoutedVersion
from registry.routed_models import ROUTING_SUITE, RoutingEval, RoutingGate
from server.cli.registry_commands import _command, _tenant_flag, _tenant_id, operator, print_table

USAGE_ERROR = 2
"""Exit code of input the CLI refuses before touching the registry (as elsewhere)."""
EXAMPLE_FIELDS = ("messages", "prompt")


class InputError(Exception):
    """A policy or suite file the CLI refuses; ``problems`` lists every reason."""

    def __init__(self, what: str, problems: Sequence[str]) -> None:
        self.what, self.problems = what, list(problems)
        super().__init__(what)


def _refused(error: InputError) -> int:
    print(f"loraplex: {error.what}:", file=sys.stderr)
    for problem in error.problems:
        print(f"  - {problem}", file=sys.stderr)
    return USAGE_ERROR


def _store(registry: Registry, args: argparse.Namespace) -> tuple[RoutedModelStore, int]:
    return RoutedModelStore(registry), _tenant_id(registry, args)


def _when(version: RoutedVersion | RoutingEval) -> str:
    return f"{version.created_at:%Y-%m-%d %H:%M}"


def _gate_text(gate: RoutingGate) -> str:
    parts = [f"min_accuracy {gate.min_accuracy:g}"] if gate.min_accuracy is not None else []
    if gate.max_regression is not None:
        parts.append(f"max_regression {gate.max_regression:g}")
    return f"{gate.suite}: {', '.join(parts) or 'an eval required'}"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


# -- list, show -------------------------------------------------------------------------


def routed_list(registry: Registry, args: argparse.Namespace) -> int:
    store, tenant_id = _store(registry, args)
    models = store.list(tenant_id)
    if args.json:
        _print_json({"object": "list", "data": [m.to_json() for m in models]})
        return 0
    rows = [
        [m.name, m.live_version, m.latest_version, "; ".join(map(_gate_text, m.gates)) or None]
        for m in models
    ]
    print_table(["NAME", "LIVE", "LATEST", "GATES"], rows)
    return 0


def _latest_evals(evals: Sequence[RoutingEval]) -> list[RoutingEval]:
    """Each (version, suite)'s newest eval, by version then suite."""
    latest = {(e.number, e.suite): e for e in evals}  # evals come oldest first
    return [latest[key] for key in sorted(latest)]


def routed_show(registry: Registry, args: argparse.Namespace) -> int:
    store, tenant_id = _store(registry, args)
    info = store.get(tenant_id, args.name)
    versions = store.versions(tenant_id, args.name)
    latest = _latest_evals(store.evals(tenant_id, args.name))
    if args.json:
        shown = info.to_json() | {
            "versions": [v.to_json() for v in versions],
            "latest_evals": [e.to_json() for e in latest],
        }
        _print_json(shown)
        return 0
    _print_summary(info)
    suites = sorted({e.suite for e in latest})
    cells = {(e.number, e.suite): f"{e.accuracy:.3f} ({e.examples})" for e in latest}
    rows = [
        [v.number, "*" if v.live else "", v.created_by, _when(v),
         *(cells.get((v.number, s)) for s in suites), v.description or None]
        for v in versions
    ]  # fmt: skip
    print()
    print_table(["VERSION", "LIVE", "CREATED_BY", "CREATED", *suites, "DESCRIPTION"], rows)
    return 0


def _print_summary(info: RoutedModelInfo) -> None:
    live = f"version {info.live_version}" if info.live_version is not None else "none"
    print(f"routed model  {info.name}")
    print(f"live          {live} (latest {info.latest_version})")
    print(f"gates         {'; '.join(map(_gate_text, info.gates)) or 'none'}")


# -- save, promote, rollback, delete ----------------------------------------------------


def _json_file(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read the {what} {path}", [exc.strerror or str(exc)]) from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
        raise InputError(f"the {what} {path} is not JSON", [str(exc)]) from None


def _policy(document: Any, where: str) -> router.RoutingPolicy:
    try:
        return router.RoutingPolicy.from_json(document)
    except router.InvalidRoutingPolicy as exc:
        raise InputError(f"invalid routing policy in {where}", exc.problems) from None


def routed_save(registry: Registry, args: argparse.Namespace) -> int:
    try:  # checked before the registry is asked anything: nothing is written
        policy = _policy(_json_file(args.policy, "policy file"), args.policy)
    except InputError as exc:
        return _refused(exc)
    store, tenant_id = _store(registry, args)
    saved = store.save_version(
        tenant_id, args.name, policy.to_json(), policy.references(), operator(),
        args.description,
    )  # fmt: skip
    if saved.live:
        print(f"{args.name}: version {saved.number} saved; it is live")
        return 0
    print(f"{args.name}: version {saved.number} saved; not live yet")
    if not args.promote:
        print(f"promote it: loraplex routed-models promote {args.name} {saved.number} "
              f"--tenant {args.tenant}")  # fmt: skip
        return 0
    # Gates apply: a refusal leaves the saved version in place, and says so on stderr.
    store.promote(tenant_id, args.name, saved.number, operator())
    print(f"{args.name}: live -> version {saved.number}")
    return 0


def routed_promote(registry: Registry, args: argparse.Namespace) -> int:
    store, tenant_id = _store(registry, args)
    version = store.promote(tenant_id, args.name, args.version, operator(), args.override)
    print(f"{args.name}: live -> version {version.number}")
    return 0


def routed_rollback(registry: Registry, args: argparse.Namespace) -> int:
    store, tenant_id = _store(registry, args)
    version = store.rollback(tenant_id, args.name, operator())
    print(f"{args.name}: rolled back; live -> version {version.number}")
    return 0


def routed_delete(registry: Registry, args: argparse.Namespace) -> int:
    store, tenant_id = _store(registry, args)
    store.delete(tenant_id, args.name, operator())
    print(f"{args.name}: deleted (its versions and evals stay for audit; the name is free)")
    return 0


# -- gates ----------------------------------------------------------------------------


def routed_gates(registry: Registry, args: argparse.Namespace) -> int:
    setting = args.min_accuracy is not None or args.max_regression is not None
    if setting and args.clear:
        print("loraplex: give thresholds or --clear, not both", file=sys.stderr)
        return USAGE_ERROR
    store, tenant_id = _store(registry, args)
    gates = store.get(tenant_id, args.name).gates
    if args.clear:  # one suite's gate with --suite, else every gate
        keep = [g for g in gates if args.suite is not None and g.suite != args.suite]
        gates = store.set_gates(tenant_id, args.name, keep, operator())
    elif setting:  # this suite's gate replaced, the other suites' kept
        suite = args.suite or ROUTING_SUITE
        gate = RoutingGate(suite, args.min_accuracy, args.max_regression)
        others = [g for g in gates if g.suite != suite]
        gates = store.set_gates(tenant_id, args.name, [*others, gate], operator())
    if not gates:
        print(f"{args.name}: no gates (promote needs no routing eval)")
        return 0
    rows = [[g.suite, g.min_accuracy, g.max_regression] for g in gates]
    print_table(["SUITE", "MIN_ACCURACY", "MAX_REGRESSION"], rows)
    return 0


# -- eval, evals ------------------------------------------------------------------------


def _example(line: str) -> tuple[router.RequestText, str]:
    """One suite line's request text and expected target; ``ValueError`` says what is wrong."""
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object")
    problems = []
    if sum(name in data for name in EXAMPLE_FIELDS) != 1:
        problems.append('needs exactly one of "messages" (a list) and "prompt" (a string)')
    elif "messages" in data and not isinstance(data["messages"], list):
        problems.append('"messages" must be a list of chat messages')
    elif "prompt" in data and not isinstance(data["prompt"], str | list):
        problems.append('"prompt" must be a string')
    expected = data.get("expected")
    if not isinstance(expected, str) or not expected:
        problems.append('needs "expected": the name of the model it should route to')
    if "metadata" in data and not isinstance(data["metadata"], dict):
        problems.append('"metadata" must be an object of strings')
    if "user" in data and not isinstance(data["user"], str):
        problems.append('"user" must be a string')
    if problems:
        raise ValueError("; ".join(problems))
    return router.RequestText.of(data), str(expected)


def _suite_examples(path: str) -> list[tuple[router.RequestText, str]]:
    """Every example of a JSONL suite file; ``InputError`` naming every bad line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the suite file {path}", [str(exc)]) from None
    examples, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            examples.append(_example(line))
        except ValueError as exc:
            problems.append(f"line {number}: {exc}")
    if not examples and not problems:
        problems.append('no examples; write one JSON object a line with "expected"')
    if problems:
        raise InputError(f"invalid suite file {path}", problems)
    return examples


def _decide(policy: router.RoutingPolicy, text: router.RequestText) -> str:
    """The target the policy's rules (or its default) choose."""
    return (policy.by_rules(text) or policy.default_decision()).target


def routed_eval(registry: Registry, args: argparse.Namespace) -> int:
    store, tenant_id = _store(registry, args)
    version = store.version(tenant_id, args.name, args.version)
    try:
        policy = _policy(version.policy, f"{args.name} version {args.version}")
        if policy.classifier is not None:
            print(f"loraplex: {args.name} version {args.version} has a classifier, and "
                  "classifier decisions need an engine; run the eval through the gateway: "
                  f"POST /v1/routed_models/{args.name}/versions/{args.version}/evals",
                  file=sys.stderr)  # fmt: skip
            return USAGE_ERROR
        examples = _suite_examples(args.suite_file)
    except InputError as exc:
        return _refused(exc)
    table = router.confusion((expected, _decide(policy, text)) for text, expected in examples)
    accuracy = router.accuracy(table)
    store.record_eval(
        tenant_id, args.name, args.version, accuracy, len(examples), table, operator(),
        args.suite,
    )  # fmt: skip
    print(f"{args.name} version {args.version}: {args.suite} accuracy {accuracy:.3f} "
          f"on {len(examples)} examples (recorded)")  # fmt: skip
    print()
    _print_confusion(table)
    return 0


def _print_confusion(table: dict[str, dict[str, int]]) -> None:
    """Rows: expected model; columns: chosen model; the diagonal is right."""
    chosen = sorted({name for row in table.values() for name in row})
    rows = [[expected, *(table[expected].get(c, 0) for c in chosen)] for expected in sorted(table)]
    print_table(["EXPECTED\\CHOSEN", *chosen], rows)


def routed_evals(registry: Registry, args: argparse.Namespace) -> int:
    store, tenant_id = _store(registry, args)
    evals = store.evals(tenant_id, args.name)
    if args.json:
        _print_json({"object": "list", "data": [e.to_json() for e in evals]})
        return 0
    rows = [
        [e.number, e.suite, f"{e.accuracy:.3f}", e.examples, _when(e), e.created_by] for e in evals
    ]
    print_table(["VERSION", "SUITE", "ACCURACY", "EXAMPLES", "CREATED", "CREATED_BY"], rows)
    return 0


# -- parser wiring ----------------------------------------------------------------------


def _named(commands: Any, name: str, handler: Any, help: str, version: bool = False) -> Any:
    parser = _command(commands, name, handler, help)
    parser.add_argument("name", help="the routed model's name")
    if version:
        parser.add_argument("version", type=int, help="the version's number")
    _tenant_flag(parser)
    return parser


def add_commands(sub: Any) -> None:
    """Register ``routed-models`` on the ``loraplex`` parser."""
    group = sub.add_parser("routed-models", help="a tenant's routed models and their policies")
    commands = group.add_subparsers(dest="routed_command", required=True, metavar="COMMAND")
    listing = _command(commands, "list", routed_list, "list a tenant's routed models")
    _tenant_flag(listing)
    show = _named(commands, "show", routed_show, "versions, gates and latest evals")
    for parser in (listing, show):
        parser.add_argument("--json", action="store_true", help="print JSON")
    save = _named(commands, "save", routed_save, "save a policy as the next version")
    save.add_argument("--policy", required=True, metavar="FILE.json", help="the routing policy")
    save.add_argument("--description", default="", help="what changed in this version")
    save.add_argument("--promote", action="store_true", help="make it live (gates apply)")
    promote = _named(commands, "promote", routed_promote, "make a version live", version=True)
    promote.add_argument(
        "--override", action="store_true", help="promote even if gates fail (recorded)"
    )
    _named(commands, "rollback", routed_rollback, "make the previous live version live again")
    _named(commands, "delete", routed_delete, "delete it (the name becomes free)")
    gates = _named(commands, "gates", routed_gates, "show or set promotion gates")
    gates.add_argument("--suite", help=f"the gate's suite (default when setting: {ROUTING_SUITE})")
    gates.add_argument("--min-accuracy", type=float, help="accuracy a candidate must reach")
    gates.add_argument(
        "--max-regression", type=float, help="accuracy a candidate may lose against the live one"
    )
    gates.add_argument("--clear", action="store_true", help="remove the gates (--suite: one)")
    run = _named(commands, "eval", routed_eval, "route a labelled suite, record it", version=True)
    run.add_argument("--suite-file", required=True, metavar="FILE.jsonl", help="examples")
    run.add_argument("--suite", default=ROUTING_SUITE, help="the suite's name (%(default)s)")
    evals = _named(commands, "evals", routed_evals, "routing evals over versions")
    evals.add_argument("--json", action="store_true", help="print JSON")
