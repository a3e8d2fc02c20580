"""``loraplex bases upgrade`` / ``bases upgrades`` on a real (SQLite) registry: the dry run's
table, the start, the per-adapter table and JSON, ``--advance``, ``--follow`` to the end
(with the test playing the worker), ``--cancel``, and refusals as one-line errors."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest

from registry import LocalBlobStore, Registry
from registry.upgrades import UpgradeStore
from tests.registry.registry_testdata import BASE_NAME, build_adapter, build_tiny_base
from tests.registry.upgrade_testdata import NEW_NAME, OPERATOR, Fleet
from tests.server.cli.harness import Cli


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Cli, Fleet, Path]:
    """Tenant acme's bot and easy (trained) and up (uploaded), other's theirs, on the old
    base; a second base registered; the CLI on the registry."""
    run = Cli(tmp_path, capsys)
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "blobs"))
    old = build_tiny_base(tmp_path / "old")
    registry.register_base(old, BASE_NAME, "r1", OPERATOR)
    new = build_tiny_base(tmp_path / "new", layers=3)
    registry.register_base(new, NEW_NAME, "r1", OPERATOR)
    adapters = {f"v{i}": build_adapter(old, tmp_path / f"v{i}", seed=i) for i in (1, 2, 3)}
    acme, other = (registry.create_tenant(n, OPERATOR).id for n in ("acme", "other"))
    assert acme is not None and other is not None
    new_adapter = build_adapter(new, tmp_path / "new-adapter", seed=5)
    return run, Fleet(registry, adapters, acme, other), new_adapter


def test_dry_run_start_follow_and_the_tables(cli: tuple[Cli, Fleet, Path]) -> None:
    run, fleet, new_adapter = cli
    plan = run.ok("bases", "upgrade", BASE_NAME, NEW_NAME, "--dry-run").splitlines()
    assert plan[0].startswith(f"plan: upgrade {BASE_NAME}@r1 -> {NEW_NAME}@r1, 4 adapter(s)")
    assert plan[1].split()[:4] == ["TENANT", "ADAPTER", "VERSION", "KIND"]
    assert [line.split()[:4] for line in plan[2:4]] == [
        ["acme", "bot", "1", "trained"],
        ["acme", "easy", "1", "trained"],
    ]
    # Far enough ahead that nothing below reaches it before the sleep does.
    deadline_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=15)
    deadline = deadline_at.isoformat()
    started = run.ok("bases", "upgrade", BASE_NAME, NEW_NAME, "--deadline", deadline,
                     "--uploaded-past-deadline", "retire", "--canary-seconds", "0")  # fmt: skip
    uid = started.split()[1].rstrip(":")
    assert uid.startswith("upg_") and "4 adapter(s)" in started
    advanced = run.ok("bases", "upgrades", uid, "--advance")
    assert "acme/bot: evaluating" in advanced and "acme/up: awaiting" in advanced
    store = UpgradeStore(fleet.registry)
    items = {item.adapter: item for item, _ in store.get(uid).items}
    fleet.evaluated(items["bot"].eval_job or "", 0.1)
    fleet.evaluated(items["easy"].eval_job or "", 0.9)
    store.advance(uid)
    store.choose(fleet.acme, uid, "easy", "retire", OPERATOR)
    fleet.retrained(store.get(uid).items[0][0].retrain_job or "", 0.85, new_adapter)
    shown = json.loads(run.ok("bases", "upgrades", uid, "--json"))
    assert {i["adapter"]: i["state"] for i in shown["items"]}["easy"] == "retired"
    assert {i["adapter"]: i["state"] for i in shown["items"]}["up"] == "awaiting"
    # Past the deadline: the uploaded adapters are retired.
    time.sleep(max(0.0, (deadline_at - dt.datetime.now(dt.UTC)).total_seconds()) + 0.2)
    followed = run.ok("bases", "upgrades", uid, "--follow", "--interval", "0.1")
    for line in ("acme/bot: canary", "acme/bot: promoted", "acme/bot: migrated",
                 "acme/up: retired", "upgrade: done"):  # fmt: skip
        assert line in followed, line
    assert f"left on {BASE_NAME}@r1: nothing" in followed
    listed = run.ok("bases", "upgrades").splitlines()
    assert listed[1].split()[:5] == [uid, f"{BASE_NAME}@r1", f"{NEW_NAME}@r1", "done", "4/4"]


def test_cancel_and_refusals(cli: tuple[Cli, Fleet, Path]) -> None:
    run, _, _ = cli
    uid = run.ok("bases", "upgrade", BASE_NAME, NEW_NAME).split()[1].rstrip(":")
    code, _, err = run("bases", "upgrade", BASE_NAME, NEW_NAME)
    assert code == 1 and "is running" in err
    cancelled = run.ok("bases", "upgrades", uid, "--cancel")
    assert "cancelled" in cancelled.splitlines()[0]
    code, _, err = run("bases", "upgrade", BASE_NAME, NEW_NAME, "--deadline", "tomorrow")
    assert code == 1 and "not an ISO datetime" in err
    code, _, err = run("bases", "upgrade", BASE_NAME, NEW_NAME, "--canary-weight", "5")
    assert code == 1 and "canary_weight" in err
    code, _, err = run("bases", "upgrades", "--follow")
    assert code == 1 and "need an upgrade id" in err
