"""``loraplex adapters alias|aliases|tag|search`` on a real (SQLite) registry: custom
aliases set, listed with history and deleted; tags set, deleted and shown; the search;
the registry's refusals as one-line errors; another tenant's adapter like an unknown one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from registry import Actor, LocalBlobStore, Registry
from tests.registry.registry_testdata import build_adapter, build_tiny_base
from tests.server.cli.harness import Cli

OPERATOR = Actor("test", admin=True)


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[tuple[Cli, Registry, int]]:
    """Tenant acme's adapter bot: v1 in production, v2 pushed; tenant globex; the CLI."""
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "blobs"))
    acme, _ = (registry.create_tenant(name, OPERATOR).id for name in ("acme", "globex"))
    assert acme is not None
    base = build_tiny_base(tmp_path / "tiny")
    registry.register_base(base, "tiny", "r1", OPERATOR)
    weights = [build_adapter(base, tmp_path / f"w{n}", seed=n) for n in (1, 2)]
    for path in weights:
        registry.push_adapter(acme, "bot", path, "tiny", OPERATOR)
    registry.promote(acme, "bot", 1, OPERATOR)
    yield Cli(tmp_path, capsys), registry, acme
    registry.close()


def _rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()[1:]]


def test_a_custom_alias_is_set_listed_with_history_and_deleted(
    cli: tuple[Cli, Registry, int],
) -> None:
    run, registry, tenant_id = cli
    said = run.ok("adapters", "alias", "bot", "staging", "2", "--tenant", "acme")
    assert said.strip() == "bot: staging -> version 2 (request it as bot:staging)"
    run.ok("adapters", "alias", "bot", "staging", "1", "--tenant", "acme")
    shown = _rows(run.ok("adapters", "show", "bot", "--tenant", "acme"))
    assert shown[0][0] == "1" and shown[0][5] == "production,staging"  # both aliases shown
    assert shown[1][0] == "2" and "staging" not in shown[1]
    listed = _rows(run.ok("adapters", "aliases", "bot", "--tenant", "acme"))
    assert [r[:3] for r in listed] == [["production", "1", "built-in"], ["staging", "1", "custom"]]
    history = run.ok("adapters", "aliases", "bot", "--history", "staging", "--tenant", "acme")
    assert [r[2:5] for r in _rows(history)] == [
        ["adapter.alias_set", "-", "2"],
        ["adapter.alias_set", "2", "1"],
    ]
    run.ok("adapters", "alias", "bot", "staging", "--delete", "--tenant", "acme")
    assert "staging" not in registry.aliases(tenant_id, "bot")
    code, _, err = run("adapters", "alias", "bot", "production", "2", "--tenant", "acme")
    assert code == 1 and "loraplex adapters promote" in err
    code, _, err = run("adapters", "alias", "bot", "staging", "--tenant", "acme")
    assert code == 2 and "give a VERSION" in err


def test_tags_are_set_deleted_shown_and_searched(cli: tuple[Cli, Registry, int]) -> None:
    run, _, _ = cli
    shown = run.ok("adapters", "tag", "bot", "2", "team=search", "ds=nov", "--tenant", "acme")
    assert _rows(shown) == [["ds", "nov"], ["team", "search"]]
    run.ok("adapters", "tag", "bot", "1", "team=search", "--tenant", "acme")
    run.ok("adapters", "alias", "bot", "staging", "2", "--tenant", "acme")
    after = run.ok("adapters", "tag", "bot", "2", "--delete", "ds", "--tenant", "acme")
    assert _rows(after) == [["team", "search"]]
    found = run.ok("adapters", "search", "--tag", "team=search", "--alias", "staging",
                   "--tenant", "acme")  # fmt: skip
    assert _rows(found) == [["bot", "2", "active", "staging", "team=search"]]
    both = run.ok("adapters", "search", "--tag", "team", "--tenant", "acme")
    assert [r[:2] for r in _rows(both)] == [["bot", "1"], ["bot", "2"]]
    code, _, err = run("adapters", "tag", "bot", "2", "novalue", "--tenant", "acme")
    assert code == 1 and "write key=value" in err
    code, _, err = run("adapters", "search", "--tag", "=x", "--tenant", "acme")
    assert code == 1 and "tag filter" in err


def test_another_tenants_adapter_reads_like_an_unknown_one(
    cli: tuple[Cli, Registry, int],
) -> None:
    run, _, _ = cli
    run.ok("adapters", "tag", "bot", "2", "team=search", "--tenant", "acme")
    for argv in (
        ("adapters", "alias", "{}", "staging", "2"),
        ("adapters", "aliases", "{}"),
        ("adapters", "tag", "{}", "2", "a=b"),
    ):
        answers = [run(*[a.format(n) for a in argv], "--tenant", "globex") for n in ("bot", "x")]
        assert [a[0] for a in answers] == [1, 1]
        assert answers[0][2] == answers[1][2].replace("'x'", "'bot'"), argv
    assert _rows(run.ok("adapters", "search", "--tag", "team", "--tenant", "globex")) == []
