"""``loraplex datasets create|list|show|versions|add|examples``: versioned datasets from a shell.

Like the other registry commands they act directly on the registry the settings name, as
an admin operator (audited as ``cli:<user>``), on the dataset of the tenant ``--tenant``
names. ``add`` takes a local JSONL file (checked, then uploaded as a fine-tuning file)
or the id of one already uploaded, and runs the data audit on the new version, as
``POST /v1/datasets/{name}/versions`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from registry import RegistryError, tenant_ref
from registry.datasets import DatasetStore, DatasetVersion, VersionChange
from registry.jobs import FINE_TUNE_PURPOSE, JobStore
from server.api.datasets_routes import add_file_version, latest_number
from server.cli.registry_commands import REGISTRY_SETTINGS, open_registry, operator, print_table
from server.config import add_settings_flags
from training.data import DatasetError, load_jsonl

DatasetHandler = Callable[[DatasetStore, int, argparse.Namespace], int]


def _dataset_command(handler: DatasetHandler) -> Callable[[argparse.Namespace], int]:
    """Open the registry and the tenant, run ``handler``; errors become a message, exit 1."""

    def run(args: argparse.Namespace) -> int:
        registry = open_registry(args)
        try:
            tenant = registry.get_tenant(tenant_ref(args.tenant))
            assert tenant.id is not None
            return handler(DatasetStore(JobStore(registry)), tenant.id, args)
        except (RegistryError, DatasetError) as exc:
            print(f"loraplex: {exc}", file=sys.stderr)
            return 1
        finally:
            registry.close()

    return run


def datasets_create(store: DatasetStore, tenant_id: int, args: argparse.Namespace) -> int:
    dataset = store.create(tenant_id, args.name, args.description)
    print(f"created dataset {dataset.name}; add a version: loraplex datasets add {dataset.name} "
          f"--tenant {args.tenant} --file DATA.jsonl")  # fmt: skip
    return 0


def datasets_list(store: DatasetStore, tenant_id: int, args: argparse.Namespace) -> int:
    rows = [
        [d.name, latest_number(store, tenant_id, d.name), f"{d.created_at:%Y-%m-%d %H:%M}",
         d.description or None]
        for d in store.list_datasets(tenant_id)
    ]  # fmt: skip
    print_table(["NAME", "LATEST", "CREATED", "DESCRIPTION"], rows)
    return 0


def _version_row(v: DatasetVersion) -> list[Any]:
    return [
        v.number,
        v.example_count,
        f"+{v.added} -{v.removed}",
        v.method,
        v.file_id,
        (v.audit or {}).get("leakage", {}).get("groups"),
        f"{v.created_at:%Y-%m-%d %H:%M}",
    ]


def datasets_versions(store: DatasetStore, tenant_id: int, args: argparse.Namespace) -> int:
    rows = [_version_row(v) for v in store.versions(tenant_id, args.name)]
    print_table(["VERSION", "EXAMPLES", "CHANGE", "METHOD", "FILE", "LEAKS", "CREATED"], rows)
    return 0


def datasets_show(store: DatasetStore, tenant_id: int, args: argparse.Namespace) -> int:
    """The version as JSON: its fields, diff and audit report."""
    version = store.get_version(tenant_id, args.name, args.version)
    diff = store.diff(version)
    shown = {
        "dataset": args.name,
        "number": version.number,
        "sha256": version.sha256,
        "examples": version.example_count,
        "method": version.method,
        "file_id": version.file_id,
        "source": version.source,
        "diff": {"added": len(diff.added), "removed": len(diff.removed)},
        "audit": version.audit,
    }
    print(json.dumps(shown, indent=2))
    return 0


def _uploaded(store: DatasetStore, tenant_id: int, path: Path) -> str:
    """Check a local JSONL file, then upload it as a fine-tuning file; its id."""
    if not path.is_file():
        raise DatasetError(str(path), ["no such file; give the path of a JSONL file"])
    content = path.read_bytes()
    load_jsonl(content, str(path))  # refuse it before it is stored
    return store.jobs.create_file(tenant_id, path.name, FINE_TUNE_PURPOSE, content).id


def datasets_add(store: DatasetStore, tenant_id: int, args: argparse.Namespace) -> int:
    if args.file is None and args.training_file is None and not args.remove:
        print("loraplex: give --file DATA.jsonl, --training-file FILE_ID or --remove ADDRESS",
              file=sys.stderr)  # fmt: skip
        return 2
    store.get(tenant_id, args.name)  # an unknown dataset before any upload
    file_id = args.training_file
    if args.file is not None:
        file_id = _uploaded(store, tenant_id, Path(args.file))
    source: dict[str, Any] = {"removed": list(args.remove), "replace": args.replace}
    change = VersionChange((), args.remove, args.replace, args.method, source)
    version, new = add_file_version(store, tenant_id, args.name, change, file_id, operator())
    if not new:
        print(f"{args.name}: unchanged, still version {version.number} (same examples, same order)")
        return 0
    leaks = (version.audit or {}).get("leakage", {}).get("groups", 0)
    print(f"{args.name} version {version.number}: {version.example_count} examples "
          f"(+{version.added} -{version.removed}), file {version.file_id}, {leaks} leak group(s)"
          f"; details: loraplex datasets show {args.name} --tenant {args.tenant}")  # fmt: skip
    return 0


def datasets_examples(store: DatasetStore, tenant_id: int, args: argparse.Namespace) -> int:
    """One JSON line per example: its address and content (null where erased)."""
    examples = store.examples(store.get_version(tenant_id, args.name, args.version))
    start = 0
    if args.after is not None:
        addresses = [sha for sha, _ in examples]
        if args.after not in addresses:
            print(f"loraplex: {args.after} is not an example of that version", file=sys.stderr)
            return 1
        start = addresses.index(args.after) + 1
    for sha, content in examples[start : start + args.limit]:
        print(json.dumps({"id": sha, "example": content}, ensure_ascii=False))
    return 0


def _command(commands: Any, name: str, handler: DatasetHandler, help: str) -> Any:
    parser = commands.add_parser(name, help=help)
    add_settings_flags(parser, REGISTRY_SETTINGS)
    parser.add_argument("--tenant", required=True, help="tenant name or id")
    parser.set_defaults(func=_dataset_command(handler))
    if name != "list":
        parser.add_argument("name", help="dataset name")
    return parser


def add_commands(sub: Any) -> None:
    """Register ``datasets`` and its subcommands on the ``loraplex`` parser."""
    group = sub.add_parser("datasets", help="versioned fine-tuning datasets")
    commands = group.add_subparsers(dest="datasets_command", required=True, metavar="COMMAND")
    create = _command(commands, "create", datasets_create, "create a dataset")
    create.add_argument("--description", default="")
    _command(commands, "list", datasets_list, "list a tenant's datasets")
    _command(commands, "versions", datasets_versions, "list a dataset's versions")
    for name, handler, help in (
        ("show", datasets_show, "a version's details, diff and audit (JSON)"),
        ("examples", datasets_examples, "a version's examples as JSON lines"),
    ):
        parser = _command(commands, name, handler, help)
        parser.add_argument("--version", type=int, default=None, help="default: the latest")
    examples = commands.choices["examples"]
    examples.add_argument("--after", help="start after this example address")
    examples.add_argument("--limit", type=int, default=100, help="most examples shown")
    add = _command(commands, "add", datasets_add, "make a version from the latest one")
    source = add.add_mutually_exclusive_group()
    source.add_argument("--file", help="a local JSONL file to upload and add")
    source.add_argument("--training-file", help="the id of an uploaded fine-tuning file")
    add.add_argument("--remove", action="append", default=[], metavar="ADDRESS",
                     help="leave out this example (repeatable)")  # fmt: skip
    add.add_argument("--replace", action="store_true", help="start from no examples")
    add.add_argument("--method", choices=["supervised", "dpo"], default="supervised")
