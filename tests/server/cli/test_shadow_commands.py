"""``loraplex adapters shadow`` on a real (SQLite) registry: set, show, record, clear, and
the registry's refusals as one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry import Actor, LocalBlobStore, Registry
from registry.shadow import ShadowBatch, ShadowStore
from tests.registry.registry_testdata import build_adapter, build_tiny_base
from tests.server.cli.harness import Cli

OPERATOR = Actor("test", admin=True)


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Cli, Registry, int]:
    """Tenant acme's adapter bot: v1 in production, v2 pushed; the CLI on its registry."""
    cli = Cli(tmp_path, capsys)
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "blobs"))
    tenant_id = registry.create_tenant("acme", OPERATOR).id
    assert tenant_id is not None
    base = build_tiny_base(tmp_path / "tiny")
    registry.register_base(base, "tiny", "r1", OPERATOR)
    for seed in (1, 2):
        adapter = build_adapter(base, tmp_path / f"v{seed}", seed=seed)
        registry.push_adapter(tenant_id, "bot", adapter, "tiny", OPERATOR)
    registry.promote(tenant_id, "bot", 1, OPERATOR)
    return cli, registry, tenant_id


def _fields(out: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in out.splitlines())


def test_set_show_record_and_clear(cli: tuple[Cli, Registry, int]) -> None:
    run, registry, tenant_id = cli
    assert _fields(run.ok("adapters", "shadow", "bot", "--tenant", "acme"))["shadow"].startswith(
        "none"
    )
    shown = _fields(run.ok("adapters", "shadow", "bot", "2", "--share", "0.25", "--tenant", "acme"))
    assert shown["shadow"] == "v2, 25% of production's requests"
    assert (shown["production"], shown["compared"]) == ("v1", "0 copies yet")
    pairs = [(["{}"], ["{}"]), (["{}"], ["no"]), (["{}"], ["{}"])]
    ShadowStore(registry).add(ShadowBatch(tenant_id, "bot", 2, 1, pairs, prompt_tokens=9))
    shown = _fields(run.ok("adapters", "shadow", "bot", "--tenant", "acme"))
    assert shown["agreement"] == "2 of 3 (66.7%)" and shown["json_valid"] == "2 of 3 (66.7%)"
    assert shown["tokens"] == "9 prompt, 0 completion"
    as_json = json.loads(run.ok("adapters", "shadow", "bot", "--json", "--tenant", "acme"))
    assert as_json["results"]["compared"] == 3
    recorded = run.ok("adapters", "shadow", "bot", "--record", "--tenant", "acme")
    assert "bot: shadow/agreement = 0.667 (3 copies)" in recorded
    assert {r.metric for r in registry.eval_results(tenant_id, "bot", 2)} == {
        "agreement",
        "json_valid",
    }
    assert run.ok("adapters", "shadow", "bot", "--clear", "--tenant", "acme").strip() == (
        "bot: shadow cleared"
    )


def test_refusals_are_one_line_errors(cli: tuple[Cli, Registry, int]) -> None:
    run, _, _ = cli
    code, _, err = run("adapters", "shadow", "bot", "1", "--share", "0.5", "--tenant", "acme")
    assert code != 0 and "is the production version" in err
    code, _, err = run("adapters", "shadow", "bot", "2", "--share", "2", "--tenant", "acme")
    assert code != 0 and "outside (0, 1]" in err
    code, _, err = run("adapters", "shadow", "nothing", "--tenant", "acme")
    assert code != 0 and "does not exist" in err
