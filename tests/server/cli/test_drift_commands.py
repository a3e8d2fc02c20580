"""``loraplex adapters drift NAME --tenant T`` on a real (SQLite) registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry import Actor, LocalBlobStore, Registry
from registry.drift import DriftStore, sketch_prompts
from server.cli.main import main
from tests.registry.registry_testdata import build_adapter, build_tiny_base

OPERATOR = Actor("test", admin=True)
ON_TOPIC = [f"Where is the {noun}?" for noun in ("cat", "dog", "boat", "tree", "lamp")]
OFF_TOPIC = ["Explain the tax implications of exercising stock options before an IPO."]


@pytest.fixture
def site(tmp_path: Path) -> tuple[Registry, int, list[str]]:
    """A registry with tenant acme and adapter bot (v1 in production), and the CLI flags."""
    url, blobs = f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "blobs"
    registry = Registry(url, LocalBlobStore(blobs))
    tenant_id = registry.create_tenant("acme", OPERATOR).id
    assert tenant_id is not None
    base = build_tiny_base(tmp_path / "tiny")
    registry.register_base(base, "tiny", "r1", OPERATOR)
    adapter = build_adapter(base, tmp_path / "v1", seed=1)
    registry.push_adapter(tenant_id, "bot", adapter, "tiny", OPERATOR)
    registry.promote(tenant_id, "bot", 1, OPERATOR)
    flags = ["--home", str(tmp_path), "--database-url", url, "--blob-url", str(blobs)]
    return registry, tenant_id, flags


def _run(capsys: pytest.CaptureFixture[str], flags: list[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["adapters", "drift", *argv, "--tenant", "acme", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def _fields(out: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in out.splitlines())


def test_unknown_then_drifting_then_within_the_threshold(
    capsys: pytest.CaptureFixture[str], site: tuple[Registry, int, list[str]]
) -> None:
    registry, tenant_id, flags = site
    code, out, err = _run(capsys, flags, "bot")
    assert code == 0, err
    shown = _fields(out)
    assert shown["score"] == "unknown (threshold 0.35)"
    assert shown["state"].startswith("not checked yet")
    assert "no reference sketch" in shown["reason"]
    store = DriftStore(registry)
    version = registry.get_version(tenant_id, "bot", 1)
    assert version.id is not None
    store.set_reference(version.id, sketch_prompts(ON_TOPIC * 20))
    store.add_live(tenant_id, "bot", sketch_prompts(OFF_TOPIC * 30))
    store.check(tenant_id, "bot", OPERATOR, threshold=0.35)
    shown = _fields(_run(capsys, flags, "bot")[1])
    assert shown["score"].endswith("(past the threshold 0.35)")
    assert shown["state"].startswith("drifting since ")
    assert shown["version"] == "production v1 (reference: 100 prompts)"
    assert shown["live"] == "30 prompts in the last 7 days"
    store.check(tenant_id, "bot", OPERATOR, threshold=0.99)
    shown = _fields(_run(capsys, flags, "bot", "--drift-threshold", "0.99", "--days", "2")[1])
    assert shown["score"].endswith("(within the threshold 0.99)")
    assert shown["state"] == "within the threshold"
    assert shown["live"] == "30 prompts in the last 2 days"


def test_an_unknown_adapter_is_an_error(
    capsys: pytest.CaptureFixture[str], site: tuple[Registry, int, list[str]]
) -> None:
    code, _, err = _run(capsys, site[2], "zzz")
    assert code == 1 and "adapter 'zzz' does not exist" in err
