"""``loraplex bases capability set|show`` and ``loraplex adapters gates`` on a real registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry import Actor, LocalBlobStore, Registry
from registry.capability import CapabilityStore, examples_sha256
from tests.registry.registry_testdata import build_adapter, build_tiny_base
from tests.server.cli.harness import Cli

EXAMPLES = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(3)]


@pytest.fixture(scope="module")
def peft(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft")
    base = build_tiny_base(root / "tiny")
    return {"base": base, "v1": build_adapter(base, root / "v1", seed=1)}


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], peft: dict[str, Path]) -> Cli:
    cli = Cli(tmp_path, capsys)
    cli.ok("bases", "register", str(peft["base"]), "--revision", "r1")
    return cli


def _jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_a_suite_is_set_from_jsonl_and_shown_with_its_reference(cli: Cli, tmp_path: Path) -> None:
    suite = _jsonl(tmp_path / "generic.jsonl", [json.dumps(e) for e in EXAMPLES])
    out = cli.ok("bases", "capability", "set", "tiny", "generic", suite)
    assert out.startswith("capability suite generic of base tiny@r1: 3 examples")
    assert "not measured yet" in cli.ok("bases", "capability", "show", "tiny", "generic")
    registry = Registry(f"sqlite:///{cli.home / 'r.db'}", LocalBlobStore(cli.home / "blobs"))
    try:
        store = CapabilityStore(registry)
        base = registry.get_base("tiny")
        store.set_reference(base, "generic", {"exact_match": 0.25}, Actor("test"),
                            sample_count=3, examples_sha256=examples_sha256(EXAMPLES))  # fmt: skip
    finally:
        registry.close()
    shown = cli.ok("bases", "capability", "show", "tiny", "generic").splitlines()
    assert shown[-2:] == ["METRIC       BASE", "exact_match  0.25"]


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        (['{"prompt": "a", "answer": "b"}', "{oops"], "line 2 is not JSON"),
        ([], "at least one example"),
        (['{"prompt": "a"}'], "'answer' must be a non-blank string"),
    ],
)
def test_bad_suite_files_fail_with_the_reason_and_store_nothing(
    cli: Cli, tmp_path: Path, lines: list[str], words: str
) -> None:
    code, _, err = cli("bases", "capability", "set", "tiny", "generic",
                       _jsonl(tmp_path / "bad.jsonl", lines))  # fmt: skip
    assert code == 1 and words in err
    code, _, err = cli("bases", "capability", "show", "tiny", "generic")
    assert code == 1 and "has no capability suite 'generic'" in err
    code, _, err = cli("bases", "capability", "show", "nope", "generic")
    assert code == 1 and "names no registered base" in err


def test_gates_with_max_below_base_are_set_shown_and_cleared(
    cli: Cli, tmp_path: Path, peft: dict[str, Path]
) -> None:
    cli.ok("tenants", "create", "acme")
    cli.ok("adapters", "push", str(peft["v1"]), "--tenant", "acme", "--name", "bot",
           "--base", "tiny")  # fmt: skip
    gates = [{"suite": "capability:generic", "metric": "exact_match", "max_below_base": 0.05}]
    path = tmp_path / "gates.json"
    path.write_text(json.dumps(gates))
    shown = cli.ok("adapters", "gates", "bot", "--tenant", "acme", "--set", str(path))
    assert shown.splitlines()[1].split() == [
        "capability:generic", "exact_match", "-", "-", "0.05", "higher"
    ]  # fmt: skip
    path.write_text(json.dumps([{**gates[0], "suite": "fine-tune-test"}]))
    code, _, err = cli("adapters", "gates", "bot", "--tenant", "acme", "--set", str(path))
    assert code == 1 and "capability suites only" in err
    path.write_text(json.dumps([{"suite": "x", "metric": "y", "typo": 1}]))
    code, _, err = cli("adapters", "gates", "bot", "--tenant", "acme", "--set", str(path))
    assert code == 1 and "unknown ['typo']" in err
    assert "0.05" in cli.ok("adapters", "gates", "bot", "--tenant", "acme")  # unchanged
    cleared = cli.ok("adapters", "gates", "bot", "--tenant", "acme", "--clear")
    assert cleared.splitlines()[1:] == []
