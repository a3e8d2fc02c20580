"""``loraplex --url URL --api-key KEY adapters|files|jobs|usage ...``: the customer CLI.

With a gateway URL (``--url`` or ``LORAPLEX_URL``) and a tenant key (``--api-key`` or
``LORAPLEX_API_KEY``) these commands go over HTTP through ``server.client``, as the key's
tenant; without a URL the ``adapters`` and ``usage`` commands are the operator's, on the
registry database (``server.cli.registry_commands``). Output is a table, or the server's
JSON with ``--json`` (``jobs follow --json``: one event per line). A refused request prints
the server's message and what to do, and exits 1. The key is never printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from server.cli.registry_commands import print_table
from server.client import (
    FineTuningJob,
    GateRule,
    LoraplexClient,
    LoraplexError,
    VersionInfo,
)

REMOTE_GROUPS = ("adapters", "files", "jobs", "usage")
"""The commands that go over HTTP when a URL is given."""
GLOBAL_VALUED = ("--url", "--api-key", "--timeout")
RemoteHandler = Callable[[LoraplexClient, argparse.Namespace], int]


# -- choosing the mode ---------------------------------------------------------------


def add_global_flags(parser: argparse.ArgumentParser) -> None:
    """``--url``, ``--api-key``, ``--timeout`` and ``--json`` before the command."""
    parser.add_argument(
        "--url", help="gateway URL (env LORAPLEX_URL): adapters/files/jobs/usage go over HTTP"
    )
    parser.add_argument("--api-key", help="tenant API key (env LORAPLEX_API_KEY)")
    parser.add_argument("--timeout", type=float, help="seconds per request (default 60)")
    parser.add_argument("--json", action="store_true", help="print JSON, not tables")


def wants_remote(argv: Sequence[str], environ: dict[str, str] | None = None) -> bool:
    """Whether ``argv`` is a customer command: a URL is set and the command is remote."""
    env = os.environ if environ is None else environ
    url, command, index = env.get("LORAPLEX_URL", ""), None, 0
    while index < len(argv):
        token = argv[index]
        name, eq, value = token.partition("=")
        if name in GLOBAL_VALUED:
            if not eq:
                index += 1
                value = argv[index] if index < len(argv) else ""
            url = value if name == "--url" else url
        elif token != "--json":
            command = token
            break
        index += 1
    return bool(url) and command in REMOTE_GROUPS


def main(argv: Sequence[str]) -> int:
    """Run a customer command (``wants_remote(argv)`` holds)."""
    args = build_parser().parse_args(argv)
    url = args.url or os.environ.get("LORAPLEX_URL", "")
    key = args.api_key or os.environ.get("LORAPLEX_API_KEY", "")
    if not key:
        print(
            "loraplex: no API key; set LORAPLEX_API_KEY or pass --api-key with your tenant key",
            file=sys.stderr,
        )
        return 2
    timeout = args.timeout or float(os.environ.get("LORAPLEX_TIMEOUT", "60"))
    try:
        with LoraplexClient(url, key, timeout=timeout) as client:
            code: int = args.func(client, args)
            return code
    except LoraplexError as exc:
        print(f"loraplex: {redacted(str(exc), key)}", file=sys.stderr)
        print(f"  what to do: {redacted(hint(exc, url), key)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader (`| head`) stopped early: not a failure of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0


def redacted(text: str, key: str) -> str:
    """``text`` without the key (a server never echoes it; this makes sure). A key too short
    to be real (a typo) would otherwise blank out ordinary words of the message."""
    return text.replace(key, "<api key>") if len(key) >= 8 else text


def hint(exc: LoraplexError, url: str) -> str:
    """What the user can do about ``exc``, beyond the server's own message."""
    if exc.code == "connection_error":
        return f"check LORAPLEX_URL (or --url): is a loraplex gateway running at {url}?"
    if exc.status == 401:
        return "check LORAPLEX_API_KEY (or --api-key): it must be a tenant key, not revoked"
    if exc.code == "tenant_key_required":
        return "use a tenant key; admin keys work with the operator commands and /admin routes"
    if exc.status == 404:
        return "check the name or id: `loraplex adapters list`, `files list` or `jobs list`"
    if exc.code == "gate_failed":
        return "add passing eval results (`loraplex adapters evals add`), or ask an operator"
    if exc.status == 429:
        wait = f" in {exc.retry_after:g}s" if exc.retry_after is not None else " later"
        return f"you hit a limit: retry{wait}, or ask your operator to raise it"
    if exc.status is not None and exc.status >= 500:
        return "retry in a few seconds; if it persists, tell your operator"
    if exc.param:
        return f"fix `{exc.param}` in the request and run it again"
    return "fix the request as the message says and run it again"


# -- output --------------------------------------------------------------------------


def emit(args: argparse.Namespace, data: Any, render: Callable[[], None]) -> int:
    """Print ``data`` as JSON with ``--json``, else run ``render``; exit status 0."""
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        render()
    return 0


def _when(value: int | str | None) -> str | None:
    """A Unix time or ISO 8601 string as ``YYYY-MM-DD HH:MM`` UTC."""
    if value is None:
        return None
    if isinstance(value, int):
        return f"{dt.datetime.fromtimestamp(value, dt.UTC):%Y-%m-%d %H:%M}"
    return value[:16].replace("T", " ")


def _version_sentence(name: str, what: str, version: VersionInfo) -> str:
    return f"{name}: {what} version {version.version} ({version.lora_name})"


# -- adapters --------------------------------------------------------------------------


def adapters_push(client: LoraplexClient, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    with tqdm(unit="B", unit_scale=True, desc=f"push {args.name}", file=sys.stderr) as bar:

        def progress(sent: int, total: int) -> None:
            bar.total = total
            bar.update(sent - bar.n)

        version = client.push_adapter(
            args.source, args.name, args.base, description=args.description, progress=progress
        )
    sentence = f"{_version_sentence(args.name, 'pushed', version)}, {version.fingerprint}"
    return emit(args, version.raw, lambda: print(sentence))


def adapters_list(client: LoraplexClient, args: argparse.Namespace) -> int:
    adapters = client.list_adapters()

    def render() -> None:
        rows = []
        for a in adapters:
            production, canary = a.aliases.get("production"), a.aliases.get("canary")
            rows.append(
                [
                    a.name,
                    production and f"v{production.version}",
                    canary and f"v{canary.version} ({canary.weight:.0%})",
                    _when(a.created_at),
                    a.description,
                ]
            )
        print_table(["NAME", "PRODUCTION", "CANARY", "CREATED", "DESCRIPTION"], rows)

    return emit(args, [a.raw for a in adapters], render)


def _versions_table(versions: Sequence[VersionInfo], aliases: dict[int, str]) -> None:
    rows = [
        [
            v.version,
            v.state + (" (base deprecated)" if v.base_deprecated else ""),
            aliases.get(v.version, ""),
            v.rank,
            v.size_bytes,
            v.lora_name,
            v.fingerprint[:12],
            _when(v.created_at),
        ]
        for v in versions
    ]
    headers = ["VERSION", "STATE", "ALIAS", "RANK", "BYTES", "LORA_NAME", "FINGERPRINT", "CREATED"]
    print_table(headers, rows)


def adapters_show(client: LoraplexClient, args: argparse.Namespace) -> int:
    adapter = client.get_adapter(args.name)

    def render() -> None:
        print(f"adapter {adapter.name}: {adapter.description or '(no description)'}")
        at: dict[int, str] = {}
        for alias, target in sorted(adapter.aliases.items()):
            at[target.version] = ", ".join(filter(None, [at.get(target.version), alias]))
        _versions_table(adapter.versions, at)

    return emit(args, adapter.raw, render)


def adapters_versions(client: LoraplexClient, args: argparse.Namespace) -> int:
    versions = client.list_versions(args.name)
    return emit(args, [v.raw for v in versions], lambda: _versions_table(versions, {}))


def adapters_promote(client: LoraplexClient, args: argparse.Namespace) -> int:
    version = client.promote(args.name, args.version, override=args.override)
    sentence = _version_sentence(args.name, "production ->", version)
    return emit(args, version.raw, lambda: print(sentence))


def adapters_canary(client: LoraplexClient, args: argparse.Namespace) -> int:
    if args.clear:
        client.clear_canary(args.name)
        return emit(args, {"cleared": True}, lambda: print(f"{args.name}: canary cleared"))
    if args.version is None:
        print("loraplex: give a VERSION, or --clear", file=sys.stderr)
        return 2
    version = client.canary(args.name, args.version, args.weight)
    sentence = _version_sentence(args.name, f"canary ({args.weight:.0%}) ->", version)
    return emit(args, version.raw, lambda: print(sentence))


def adapters_rollback(client: LoraplexClient, args: argparse.Namespace) -> int:
    version = client.rollback(args.name)
    sentence = _version_sentence(args.name, "production rolled back to", version)
    return emit(args, version.raw, lambda: print(sentence))


def adapters_retire(client: LoraplexClient, args: argparse.Namespace) -> int:
    version = client.retire(args.name, args.version)
    sentence = _version_sentence(args.name, "retired", version)
    return emit(args, version.raw, lambda: print(sentence))


def adapters_archive(client: LoraplexClient, args: argparse.Namespace) -> int:
    version = client.archive(args.name, args.version)
    sentence = _version_sentence(args.name, "archived", version)
    return emit(args, version.raw, lambda: print(sentence))


def evals_list(client: LoraplexClient, args: argparse.Namespace) -> int:
    if args.version is not None:
        results = client.eval_results(args.name, args.version)
        rows = [
            [r.suite, r.metric, r.value, r.sample_count, _when(r.created_at), r.created_by]
            for r in results
        ]
        headers = ["SUITE", "METRIC", "VALUE", "SAMPLES", "CREATED", "BY"]
        return emit(args, [r.raw for r in results], lambda: print_table(headers, rows))
    history = client.eval_history(args.name)
    rows = []
    for v in history:
        aliases = ",".join(v.aliases)
        rows += [[v.version, v.state, aliases, r.suite, r.metric, r.value] for r in v.evals]
        rows += [] if v.evals else [[v.version, v.state, aliases, None, None, None]]
    headers = ["VERSION", "STATE", "ALIASES", "SUITE", "METRIC", "VALUE"]
    return emit(args, [v.raw for v in history], lambda: print_table(headers, rows))


def evals_add(client: LoraplexClient, args: argparse.Namespace) -> int:
    result = client.add_eval(
        args.name, args.version, args.suite, args.metric, args.value, sample_count=args.samples
    )
    sentence = f"{args.name} v{args.version}: {result.suite}/{result.metric} = {result.value:g}"
    return emit(args, result.raw, lambda: print(sentence))


def _gates_table(gates: Sequence[GateRule]) -> None:
    rows = [
        [g.suite, g.metric, g.min_value, g.max_regression, g.higher_is_better, g.max_below_base]
        for g in gates
    ]
    headers = ["SUITE", "METRIC", "MIN_VALUE", "MAX_REGRESSION", "HIGHER_IS_BETTER"]
    print_table([*headers, "MAX_BELOW_BASE"], rows)


def gates_show(client: LoraplexClient, args: argparse.Namespace) -> int:
    gates = client.get_gates(args.name)
    return emit(args, [g.to_json() for g in gates], lambda: _gates_table(gates))


def gate_spec(text: str) -> GateRule:
    """``SUITE:METRIC[,min_value=X][,max_regression=X][,max_below_base=X][,lower_is_better]``."""
    head, *options = text.split(",")
    suite, sep, metric = head.partition(":")
    if not (sep and suite and metric):
        raise argparse.ArgumentTypeError(f"{text!r}: start with SUITE:METRIC")
    values: dict[str, Any] = {}
    for option in options:
        key, eq, value = option.strip().partition("=")
        if key == "lower_is_better" and not eq:
            values["higher_is_better"] = False
        elif key in ("min_value", "max_regression", "max_below_base") and eq:
            try:
                values[key] = float(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{option!r}: {value!r} is no number") from None
        else:
            raise argparse.ArgumentTypeError(
                f"{option!r}: use min_value=X, max_regression=X, max_below_base=X "
                "or lower_is_better"
            )
    return GateRule(suite, metric, **values)


def gates_set(client: LoraplexClient, args: argparse.Namespace) -> int:
    if not args.gate and not args.clear:
        print("loraplex: give one --gate or more, or --clear", file=sys.stderr)
        return 2
    gates = client.set_gates(args.name, [] if args.clear else args.gate)
    return emit(args, [g.to_json() for g in gates], lambda: _gates_table(gates))


# -- files -----------------------------------------------------------------------------


def files_upload(client: LoraplexClient, args: argparse.Namespace) -> int:
    uploaded = client.upload_file(args.path, purpose=args.purpose)
    sentence = (
        f"uploaded {uploaded.id}: {uploaded.filename}, {uploaded.line_count} lines, "
        f"{uploaded.bytes} bytes"
    )
    return emit(args, uploaded.raw, lambda: print(sentence))


def files_list(client: LoraplexClient, args: argparse.Namespace) -> int:
    files = [client.get_file(args.file_id)] if args.file_id else client.list_files()
    rows = [
        [f.id, f.filename, f.bytes, f.line_count, f.purpose, _when(f.created_at)] for f in files
    ]
    headers = ["ID", "FILENAME", "BYTES", "LINES", "PURPOSE", "CREATED"]
    return emit(args, [f.raw for f in files], lambda: print_table(headers, rows))


# -- jobs ------------------------------------------------------------------------------


def _hyperparameter(text: str) -> tuple[str, Any]:
    key, eq, value = text.partition("=")
    if not (key and eq):
        raise argparse.ArgumentTypeError(f"{text!r}: use KEY=VALUE, e.g. n_epochs=3")
    try:
        return key, json.loads(value)
    except ValueError:  # a bare word (``auto``) is a string
        return key, value


def _job_rows(jobs: Sequence[FineTuningJob]) -> None:
    rows = [
        [j.id, j.status, j.model, j.adapter_name, j.fine_tuned_model, _when(j.created_at)]
        for j in jobs
    ]
    print_table(["ID", "STATUS", "MODEL", "ADAPTER", "FINE_TUNED_MODEL", "CREATED"], rows)


def jobs_create(client: LoraplexClient, args: argparse.Namespace) -> int:
    job = client.create_job(
        args.model,
        args.training_file,
        validation_file=args.validation_file,
        hyperparameters=dict(args.hyperparameter or []),
        method=args.method,
        suffix=args.suffix,
        seed=args.seed,
    )
    emit(args, job.raw, lambda: print(f"created {job.id} ({job.status}) -> {job.adapter_name}"))
    return _follow(client, args, job.id) if args.follow else 0


def jobs_list(client: LoraplexClient, args: argparse.Namespace) -> int:
    jobs = [client.get_job(args.job_id)] if args.job_id else client.list_jobs(limit=args.limit)
    return emit(args, [j.raw for j in jobs], lambda: _job_rows(jobs))


def jobs_cancel(client: LoraplexClient, args: argparse.Namespace) -> int:
    job = client.cancel_job(args.job_id)
    return emit(args, job.raw, lambda: print(f"{job.id}: {job.status}"))


def jobs_events(client: LoraplexClient, args: argparse.Namespace) -> int:
    events = client.job_events(args.job_id, limit=args.limit)[::-1]  # oldest first
    rows = [[_when(e.created_at), e.level, e.message] for e in events]
    return emit(
        args, [e.raw for e in events], lambda: print_table(["TIME", "LEVEL", "MESSAGE"], rows)
    )


def jobs_follow(client: LoraplexClient, args: argparse.Namespace) -> int:
    return _follow(client, args, args.job_id)


def _follow(client: LoraplexClient, args: argparse.Namespace, job_id: str) -> int:
    """Print the job's events as they come; exit 0 if it succeeded, 1 if not."""
    for event in client.follow_job_events(job_id, poll_interval=args.poll_interval):
        if args.json:
            print(json.dumps(event.raw, sort_keys=True), flush=True)
        else:
            print(f"{_when(event.created_at)}  {event.level:5}  {event.message}", flush=True)
    job = client.get_job(job_id)
    print(
        f"{job.id}: {job.status}" + (f" -> {job.fine_tuned_model}" if job.fine_tuned_model else ""),
        file=sys.stderr,
    )
    return 0 if job.status == "succeeded" else 1


def jobs_checkpoints(client: LoraplexClient, args: argparse.Namespace) -> int:
    checkpoints = client.list_checkpoints(args.job_id)
    rows = [
        [c.id, c.step_number, c.fine_tuned_model_checkpoint, json.dumps(c.metrics, sort_keys=True)]
        for c in checkpoints
    ]
    headers = ["ID", "STEP", "CHECKPOINT", "METRICS"]
    return emit(args, [c.raw for c in checkpoints], lambda: print_table(headers, rows))


# -- usage -----------------------------------------------------------------------------


USAGE_COLUMNS = ("day", "adapter", "version", "requests", "prompt_tokens", "completion_tokens")


def usage(client: LoraplexClient, args: argparse.Namespace) -> int:
    if args.csv:
        print(client.usage_csv(since=args.since, until=args.until, adapter=args.adapter), end="")
        return 0
    report = client.usage(since=args.since, until=args.until, adapter=args.adapter)

    def render() -> None:
        columns = [*USAGE_COLUMNS, "errors"]
        rows: list[list[Any]] = [[line.get(c) for c in columns] for line in report.lines]
        summed = [report.totals.get(c) for c in columns[3:]]
        rows.append(["total", f"{report.since}..{report.until}", "", *summed])
        print_table([c.upper() for c in columns], rows)

    return emit(args, report.raw, render)


# -- parser wiring -----------------------------------------------------------------------


def _leaf(group: Any, name: str, handler: RemoteHandler, help: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = group.add_parser(name, help=help)
    # SUPPRESS: a --json before the command is not undone by the leaf's default.
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON")
    parser.set_defaults(func=handler)
    return parser


def _named(group: Any, name: str, handler: RemoteHandler, help: str, version: bool) -> None:
    parser = _leaf(group, name, handler, help)
    parser.add_argument("name", help="adapter name")
    if version:
        parser.add_argument("version", type=int, help="version number")


def _add_adapters(sub: Any) -> None:
    group = sub.add_parser("adapters", help="your adapters: push, versions, aliases, evals, gates")
    commands = group.add_subparsers(dest="adapters_command", required=True, metavar="COMMAND")
    push = _leaf(commands, "push", adapters_push, "upload a PEFT adapter dir or tar/zip")
    push.add_argument("source", help="PEFT output directory, or a tar/zip of it")
    push.add_argument("--name", required=True, help="adapter name")
    push.add_argument("--base", required=True, help="base name, name@revision or fingerprint")
    push.add_argument("--description", default=None)
    _leaf(commands, "list", adapters_list, "list your adapters")
    _named(commands, "show", adapters_show, "an adapter, its aliases and versions", False)
    _named(commands, "versions", adapters_versions, "an adapter's versions", False)
    _named(commands, "rollback", adapters_rollback, "restore the previous production", False)
    _named(commands, "promote", adapters_promote, "point production at a version", True)
    _named(commands, "retire", adapters_retire, "retire a version for good", True)
    _named(commands, "archive", adapters_archive, "archive a version (not served)", True)
    commands.choices["promote"].add_argument(
        "--override", action="store_true", help="promote although gates fail (admins only)"
    )
    canary = _leaf(commands, "canary", adapters_canary, "send a share of traffic to a version")
    canary.add_argument("name", help="adapter name")
    canary.add_argument("version", type=int, nargs="?", help="version number")
    canary.add_argument("--weight", type=float, default=0.1, help="share of traffic, 0..1")
    canary.add_argument("--clear", action="store_true", help="remove the canary alias")
    _add_evals(commands)
    _add_gates(commands)


def _add_evals(commands: Any) -> None:
    group = commands.add_parser("evals", help="eval results of an adapter's versions")
    evals = group.add_subparsers(dest="evals_command", required=True, metavar="COMMAND")
    listing = _leaf(evals, "list", evals_list, "every version's latest results (or one's)")
    listing.add_argument("name", help="adapter name")
    listing.add_argument("--version", type=int, help="every result of this version")
    add = _leaf(evals, "add", evals_add, "record an eval result of a version")
    add.add_argument("name", help="adapter name")
    add.add_argument("version", type=int, help="version number")
    add.add_argument("--suite", required=True)
    add.add_argument("--metric", required=True)
    add.add_argument("--value", type=float, required=True)
    add.add_argument("--samples", type=int, help="how many examples it was measured on")


def _add_gates(commands: Any) -> None:
    group = commands.add_parser("gates", help="an adapter's promotion gates")
    gates = group.add_subparsers(dest="gates_command", required=True, metavar="COMMAND")
    _leaf(gates, "show", gates_show, "the promotion gates").add_argument("name")
    replace = _leaf(gates, "set", gates_set, "replace the promotion gates")
    replace.add_argument("name", help="adapter name")
    replace.add_argument(
        "--gate",
        action="append",
        type=gate_spec,
        help="SUITE:METRIC[,min_value=X][,max_regression=X][,max_below_base=X]"
        "[,lower_is_better] (repeat for more)",
    )
    replace.add_argument("--clear", action="store_true", help="remove every gate")


def _add_files(sub: Any) -> None:
    group = sub.add_parser("files", help="your training files")
    commands = group.add_subparsers(dest="files_command", required=True, metavar="COMMAND")
    upload = _leaf(commands, "upload", files_upload, "upload a JSONL training file")
    upload.add_argument("path")
    upload.add_argument("--purpose", default="fine-tune")
    listing = _leaf(commands, "list", files_list, "list your files (or show one)")
    listing.add_argument("file_id", nargs="?", help="only this file")


def _add_jobs(sub: Any) -> None:
    group = sub.add_parser("jobs", help="your fine-tuning jobs")
    commands = group.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")
    create = _leaf(commands, "create", jobs_create, "queue a fine-tuning job")
    create.add_argument("--model", required=True, help="a base, or adapter[@N|:alias]")
    create.add_argument("--training-file", required=True, help="a file id (files upload)")
    create.add_argument("--validation-file")
    create.add_argument("--suffix", help="the adapter the result registers under")
    create.add_argument("--seed", type=int)
    create.add_argument("--method", choices=["supervised", "dpo"])
    create.add_argument(
        "--hyperparameter", "-p", action="append", type=_hyperparameter, help="KEY=VALUE"
    )
    create.add_argument("--follow", action="store_true", help="then print its events live")
    listing = _leaf(commands, "list", jobs_list, "your newest jobs (or show one)")
    listing.add_argument("job_id", nargs="?", help="only this job")
    listing.add_argument("--limit", type=int, default=20)
    for name, handler, help in (
        ("cancel", jobs_cancel, "cancel a queued or running job"),
        ("events", jobs_events, "a job's newest events"),
        ("follow", jobs_follow, "print a job's events live until it ends"),
        ("checkpoints", jobs_checkpoints, "a job's checkpoints"),
    ):
        _leaf(commands, name, handler, help).add_argument("job_id")
    commands.choices["events"].add_argument("--limit", type=int, default=100)
    for parser in (create, commands.choices["follow"]):
        parser.add_argument("--poll-interval", type=float, default=2.0, help="seconds")


def _add_usage(sub: Any) -> None:
    parser = _leaf(sub, "usage", usage, "your requests and tokens by day and adapter")
    parser.add_argument("--since", type=dt.date.fromisoformat, help="first UTC day, YYYY-MM-DD")
    parser.add_argument("--until", type=dt.date.fromisoformat, help="last UTC day, YYYY-MM-DD")
    parser.add_argument("--adapter", help='only this adapter ("" for the base model)')
    parser.add_argument("--csv", action="store_true", help="CSV with a header row")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex", description="The loraplex customer CLI, over HTTP with a tenant key."
    )
    add_global_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_adapters(sub)
    _add_files(sub)
    _add_jobs(sub)
    _add_usage(sub)
    return parser
