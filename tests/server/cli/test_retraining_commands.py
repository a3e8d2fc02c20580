"""``loraplex retraining set|show|delete|run-now`` on a real (SQLite) registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry import Actor, LocalBlobStore, Registry
from registry.datasets import DatasetStore, NewExample, VersionChange
from registry.jobs import JobStore
from server.cli.main import main
from tests.registry.registry_testdata import build_adapter, build_tiny_base

OPERATOR = Actor("test", admin=True)


@pytest.fixture
def flags(tmp_path: Path) -> list[str]:
    """A registry with tenant acme, adapter bot (v1 in production) and dataset support."""
    url, blobs = f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "blobs"
    registry = Registry(url, LocalBlobStore(blobs))
    tenant_id = registry.create_tenant("acme", OPERATOR).id
    assert tenant_id is not None
    base = build_tiny_base(tmp_path / "tiny")
    registry.register_base(base, "tiny", "r1", OPERATOR)
    adapter = build_adapter(base, tmp_path / "v1", seed=1)
    registry.push_adapter(tenant_id, "bot", adapter, "tiny", OPERATOR)
    registry.promote(tenant_id, "bot", 1, OPERATOR)
    datasets = DatasetStore(JobStore(registry))
    datasets.create(tenant_id, "support")
    example = {"prompt": "Hi?", "completion": "Hello."}
    change = VersionChange(add=[NewExample(example, "file", "upload")])
    datasets.add_version(tenant_id, "support", change, OPERATOR)
    registry.close()
    return ["--home", str(tmp_path), "--database-url", url, "--blob-url", str(blobs)]


def _run(capsys: pytest.CaptureFixture[str], flags: list[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["retraining", *argv, "--tenant", "acme", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_set_show_run_now_and_delete(capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    code, out, err = _run(capsys, flags, "set", "bot", "--dataset", "support", "--every", "60",
                          "--set", "n_epochs=1")  # fmt: skip
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["dataset"], shown["every_seconds"], shown["hyperparameters"]) == (
        "support", 60, {"n_epochs": 1}
    )  # fmt: skip
    code, out, _ = _run(capsys, flags, "show")
    assert code == 0 and out.splitlines()[1].split()[:3] == ["bot", "support", "60"]
    code, out, err = _run(capsys, flags, "run-now", "bot")
    assert code == 0 and out.startswith("Queued job ftjob-"), err
    assert "starting from version 1's weights" in out
    code, out, _ = _run(capsys, flags, "run-now", "bot")
    assert code == 0 and out.startswith("Skipped: dataset 'support' version 1 is unchanged")
    assert json.loads(_run(capsys, flags, "show", "bot")[1])["last_job"] is not None
    assert _run(capsys, flags, "delete", "bot")[0] == 0
    code, _, err = _run(capsys, flags, "show", "bot")
    assert code == 1 and "has no retraining policy" in err


def test_bad_policies_are_refused_with_what_to_change(
    capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    code, _, err = _run(capsys, flags, "set", "bot", "--dataset", "support", "--every", "9",
                        "--set", "rr=1")  # fmt: skip
    assert code == 1 and "unknown hyperparameter 'rr'" in err
    code, _, err = _run(capsys, flags, "set", "bot", "--dataset", "support")
    assert code == 1 and "needs a trigger" in err
    code, _, err = _run(capsys, flags, "set", "nope", "--dataset", "support", "--every", "9")
    assert code == 1 and "adapter 'nope' does not exist" in err
