"""``loraplex adapters compose`` on a real (SQLite) registry: a composed version with its
recipe, a malformed --parent refused by the parser, the composition's refusals as one
error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry import Actor, LocalBlobStore, Registry
from tests.registry.registry_testdata import build_adapter, build_tiny_base
from tests.server.cli.harness import Cli

OPERATOR = Actor("test", admin=True)


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Cli, Registry, int]:
    """Tenant acme's adapters a and b (version 1 each); the CLI on its registry."""
    cli = Cli(tmp_path, capsys)
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "blobs"))
    tenant_id = registry.create_tenant("acme", OPERATOR).id
    assert tenant_id is not None
    base = build_tiny_base(tmp_path / "tiny")
    registry.register_base(base, "tiny", "r1", OPERATOR)
    for seed, name in enumerate("ab", 1):
        adapter = build_adapter(base, tmp_path / name, seed=seed)
        registry.push_adapter(tenant_id, name, adapter, "tiny", OPERATOR)
    return cli, registry, tenant_id


def test_compose_pushes_the_next_version_with_its_recipe(cli: tuple[Cli, Registry, int]) -> None:
    run, registry, tenant_id = cli
    out = run.ok("adapters", "compose", "mix", "--tenant", "acme", "--parent", "a@1:0.7",
                 "--parent", "b@1:0.3", "--method", "dare_ties", "--density", "0.5",
                 "--seed", "4")  # fmt: skip
    assert out.startswith("mix version 1: lx-") and "dare_ties of a@1 x 0.7, b@1 x 0.3" in out
    (version,) = registry.list_versions(tenant_id, "mix")
    assert version.composition is not None
    assert (version.composition["method"], version.composition["seed"]) == ("dare_ties", 4)
    argv = ["--parent", "a@1", "--parent", "b@1", "--target-rank", "4", "--json"]
    shown = json.loads(run.ok("adapters", "compose", "mix", "--tenant", "acme", *argv))
    assert shown["version"] == 2 and shown["composition"]["target_rank"] == 4
    assert [p["weight"] for p in shown["composition"]["parents"]] == [1.0, 1.0]


def test_refusals_are_one_message(cli: tuple[Cli, Registry, int]) -> None:
    run, registry, tenant_id = cli
    with pytest.raises(SystemExit):
        run("adapters", "compose", "mix", "--tenant", "acme", "--parent", "a:1")
    assert "'a:1' is not NAME@VERSION[:WEIGHT]" in run.capsys.readouterr().err
    code, _, err = run("adapters", "compose", "mix", "--tenant", "acme", "--parent", "a@1",
                       "--parent", "z@1", "--method", "ties")  # fmt: skip
    assert code == 1 and err.startswith("loraplex: composition rejected (2 problem(s))")
    assert "method ties needs a density" in err and "adapter 'z' does not exist" in err
    assert registry.get_adapter(tenant_id, "mix") is None
