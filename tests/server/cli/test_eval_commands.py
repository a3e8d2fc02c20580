"""``loraplex adapters evals NAME --tenant T`` on a real (SQLite) registry: the table over
versions, ``--json``, and ``--online VERSION`` recording online metrics first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry import Actor, LocalBlobStore, Registry
from tests.registry.registry_testdata import build_adapter, build_tiny_base
from tests.server.cli.harness import Cli

OPERATOR = Actor("test", admin=True)


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path, capsys)


@pytest.fixture
def registry(cli: Cli) -> Registry:
    """Tenant acme's adapter bot: v1 in production with a task score, v2 with traffic."""
    registry = Registry(f"sqlite:///{cli.home / 'r.db'}", LocalBlobStore(cli.home / "blobs"))
    tenant_id = registry.create_tenant("acme", OPERATOR).id
    assert tenant_id is not None
    base = build_tiny_base(cli.home / "tiny")
    registry.register_base(base, "tiny", "r1", OPERATOR)
    for number in (1, 2):
        weights = build_adapter(base, cli.home / f"v{number}", seed=number)
        registry.push_adapter(tenant_id, "bot", weights, "tiny", OPERATOR)
    registry.promote(tenant_id, "bot", 1, OPERATOR)
    registry.add_eval_result(tenant_id, "bot", 1, "task", "exact_match", 0.8125, OPERATOR)
    registry.record_usage(tenant_id, "bot", 2, requests=50, errors=1)
    return registry


def _rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


def test_the_table_shows_versions_and_their_latest_metrics(cli: Cli, registry: Registry) -> None:
    header, first, second = _rows(cli.ok("adapters", "evals", "bot", "--tenant", "acme"))
    assert header == ["VERSION", "ALIASES", "task/exact_match"]
    assert (first, second) == (["1", "production", "0.8125"], ["2", "-", "-"])
    out = cli.ok("adapters", "evals", "bot", "--tenant", "acme", "--online", "2")
    header, first, second = _rows(out)
    assert header == ["VERSION", "ALIASES", "online/error_rate", "task/exact_match"]
    assert (first, second) == (["1", "production", "-", "0.8125"], ["2", "-", "0.02", "-"])
    shown = json.loads(cli.ok("adapters", "evals", "bot", "--tenant", "acme", "--json"))
    [recorded] = shown["data"][1]["evals"]
    assert (recorded["suite"], recorded["metric"], recorded["sample_count"]) == (
        "online",
        "error_rate",
        50,
    )
    assert recorded["created_by"].startswith("cli:")


def test_nothing_to_record_and_an_unknown_adapter_are_said(cli: Cli, registry: Registry) -> None:
    out = cli.ok("adapters", "evals", "bot", "--tenant", "acme", "--online", "1")
    assert out.splitlines()[0] == "version 1: no traffic or feedback yet; nothing recorded"
    code, _, err = cli("adapters", "evals", "nope", "--tenant", "acme")
    assert code == 1 and "adapter 'nope' does not exist" in err
    with pytest.raises(SystemExit) as refused:  # argparse's usage error, as in a shell
        cli("adapters", "evals", "bot", "--tenant", "acme", "--since", "yesterday")
    assert refused.value.code == 2
