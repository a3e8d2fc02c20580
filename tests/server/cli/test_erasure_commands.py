"""``loraplex erasures``: erase a file from a shell, see its lineage, list, show, retrain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry import Actor, LocalBlobStore, Registry
from registry.datasets import DatasetStore, NewExample, VersionChange
from registry.jobs import JobStore
from tests.server.cli.harness import Cli

EXAMPLE = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path, capsys)


def test_erase_a_file_then_list_show_and_retrain(cli: Cli) -> None:
    cli.ok("tenants", "create", "acme")
    registry = Registry(f"sqlite:///{cli.home / 'r.db'}", LocalBlobStore(cli.home / "blobs"))
    jobs = JobStore(registry)
    upload = jobs.create_file(1, "d.jsonl", "fine-tune", json.dumps(EXAMPLE).encode() + b"\n")
    datasets = DatasetStore(jobs)
    datasets.create(1, "intents")
    change = VersionChange(add=[NewExample(EXAMPLE, "file", upload.id)])
    datasets.add_version(1, "intents", change, Actor("test"))
    registry.close()

    shown = json.loads(cli.ok("erasures", "erase", "--tenant", "acme", "--file", upload.id))
    assert (shown["kind"], shown["subject"], shown["lineage"]["examples"]) == ("file", upload.id, 1)
    assert shown["lineage"]["dataset_versions"] == [{"dataset": "intents", "version": 1}]
    listed = cli.ok("erasures", "list", "--tenant", "acme").splitlines()
    assert listed[1].split()[0] == shown["id"] and len(listed) == 2
    assert json.loads(cli.ok("erasures", "show", shown["id"], "--tenant", "acme")) == shown
    retrain = cli.ok("erasures", "retrain", shown["id"], "--tenant", "acme")
    assert retrain == "nothing trained on the erased data: no job queued\n"


def test_erase_needs_exactly_one_subject(cli: Cli) -> None:
    cli.ok("tenants", "create", "acme")
    with pytest.raises(SystemExit, match="give one of --user, --file or --completion"):
        cli("erasures", "erase", "--tenant", "acme")
    code, _, err = cli("erasures", "show", "erasure-nope", "--tenant", "acme")
    assert code != 0 and "does not exist" in err
