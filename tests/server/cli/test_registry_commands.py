"""``loraplex tenants|keys|bases|adapters``: the lifecycle from a shell, on a real registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry import LocalBlobStore, Registry
from tests.registry.registry_testdata import build_adapter, build_tiny_base
from tests.server.cli.harness import Cli


@pytest.fixture(scope="module")
def peft(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft")
    base = build_tiny_base(root / "tiny")
    return {"base": base, **{f"v{i}": build_adapter(base, root / f"v{i}", seed=i) for i in (1, 2)}}


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path, capsys)


def test_worked_lifecycle(cli: Cli, peft: dict[str, Path]) -> None:
    assert cli.ok("tenants", "create", "acme", "--rpm", "60") == "created tenant acme (id 1)\n"
    assert cli.ok("tenants", "list").splitlines() == [
        "ID  NAME  RPM  TPM  CONCURRENT  TOTAL_TOKENS",
        "1   acme  60   -    -           -",
    ]
    key = cli.ok("keys", "create", "--tenant", "acme").strip()
    assert key.startswith("lpx-")
    assert "registered base tiny@r1" in cli.ok(
        "bases", "register", str(peft["base"]), "--revision", "r1"
    )
    code, out, err = cli(
        "adapters", "push", str(peft["v1"]), "--tenant", "acme", "--name", "bot", "--base", "tiny"
    )
    assert code == 0 and out.startswith("bot version 1: lx-") and "push bot" in err
    cli.ok(
        "adapters", "push", str(peft["v2"]), "--tenant", "acme", "--name", "bot", "--base", "tiny"
    )
    assert (
        cli.ok("adapters", "promote", "bot", "1", "--tenant", "acme")
        == "bot: production -> version 1\n"
    )
    cli.ok("adapters", "promote", "bot", "2", "--tenant", "acme")
    assert "at 25%" in cli.ok(
        "adapters", "canary", "bot", "1", "--weight", "0.25", "--tenant", "acme"
    )
    listing = cli.ok("adapters", "list", "--tenant", "acme").splitlines()
    assert listing[0].split() == ["NAME", "LATEST", "PRODUCTION", "CANARY", "DESCRIPTION"]
    assert listing[1].split() == ["bot", "2", "v2", "v1", "(25%)", "-"]
    shown = cli.ok("adapters", "show", "bot", "--tenant", "acme").splitlines()
    assert [line.split()[0] for line in shown] == ["VERSION", "1", "2"]
    assert (
        cli.ok("adapters", "canary", "bot", "--clear", "--tenant", "acme")
        == "bot: canary cleared\n"
    )
    rolled = cli.ok("adapters", "rollback", "bot", "--tenant", "acme")
    assert rolled == "bot: production rolled back to version 1\n"
    assert (
        cli.ok("adapters", "retire", "bot", "2", "--tenant", "acme") == "bot: version 2 retired\n"
    )
    audit = cli.ok("adapters", "audit", "bot", "--tenant", "acme").splitlines()
    actions = [line.split()[4] for line in audit[1:]]
    assert actions == [
        "adapter.push",
        "adapter.push",
        "adapter.promote",
        "adapter.promote",
        "adapter.canary",
        "adapter.canary_clear",
        "adapter.rollback",
        "adapter.retire",
    ]


def test_errors_print_what_to_do_and_exit_1(cli: Cli, peft: dict[str, Path]) -> None:
    cli.ok("tenants", "create", "acme")
    code, _, err = cli(
        "adapters",
        "push",
        str(peft["v1"]),
        "--tenant",
        "acme",
        "--name",
        "bot",
        "--base",
        "missing",
    )
    assert code == 1
    assert "base 'missing' names no registered base model" in err
    code, _, err = cli("adapters", "promote", "bot", "1", "--tenant", "acme")
    assert (code, err) == (
        1,
        "loraplex: adapter 'bot' does not exist; list your adapters to see the names\n",
    )


def test_keys_and_bases_admin(cli: Cli, peft: dict[str, Path]) -> None:
    cli.ok("tenants", "create", "acme")
    admin_key = cli.ok("keys", "create", "--admin", "--name", "ops").strip()
    cli.ok("keys", "create", "--tenant", "acme")
    assert "revoked key 1" in cli.ok("keys", "revoke", "1")
    rows = [line.split() for line in cli.ok("keys", "list").splitlines()[1:]]
    assert [(r[0], r[2], r[-1]) for r in rows] == [("1", "admin", "revoked"), ("2", "tenant", "1")]
    registry = Registry(f"sqlite:///{cli.home / 'r.db'}", LocalBlobStore(cli.home / "blobs"))
    assert registry.authenticate(admin_key) is None
    registry.close()
    cli.ok("bases", "register", str(peft["base"]), "--name", "tiny")
    assert (
        cli.ok("bases", "deprecate", "tiny", "--reason", "old")
        == "deprecated tiny; flagged 0 adapter version(s)\n"
    )
    assert cli.ok("bases", "list").splitlines()[1].split()[-1] == "deprecated"
    assert cli.ok("tenants", "limits", "acme", "--max-concurrent", "3").startswith("limits of acme")


def test_tenants_capture_shows_and_replaces_a_tenants_capture(cli: Cli) -> None:
    cli.ok("tenants", "create", "acme")
    off = cli.ok("tenants", "capture", "acme")
    assert off == (
        'capture of acme: {"enabled": false, "store_by_default": false, "retention_days": 30, '
        '"max_body_bytes": 1048576}\n'
    )
    on = cli.ok("tenants", "capture", "acme", "--on", "--store-by-default", "--retention-days", "7")
    assert '"enabled": true, "store_by_default": true, "retention_days": 7' in on
    assert cli.ok("tenants", "capture", "1") == on.replace("acme", "1")
    assert '"enabled": false' in cli.ok("tenants", "capture", "acme", "--off")
    code, _, err = cli("tenants", "capture", "acme", "--on", "--retention-days", "0")
    assert code == 1 and "retention_days must be from 1 to 3650" in err
    code, _, err = cli("tenants", "capture", "ghost", "--on")
    assert code == 1 and "tenant 'ghost' does not exist" in err
