"""``loraplex routed-models`` on a real (SQLite) registry: every verb, the policy and suite
files the CLI refuses before writing anything, the classifier refusal of ``eval``, gates
refusing a promote, and another tenant's routed model answering like an unknown one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from registry import Actor, LocalBlobStore, Registry, RoutedModelStore
from tests.registry.registry_testdata import build_adapter, build_tiny_base
from tests.server.cli.harness import Cli

OPERATOR = Actor("test", admin=True)
ACME = ("--tenant", "acme")
RULES = {
    "default": "tiny",
    "rules": [
        {"target": "billing", "keywords": ["invoice", "refund"]},
        {"target": "general", "field": "metadata.team", "pattern": "^support$"},
    ],
}
CLASSIFIER = RULES | {"classifier": {"adapter": "general", "labels": {"money": "billing"}}}


@pytest.fixture(scope="module")
def peft(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A tiny base and two adapters on it, built once for the module."""
    root = tmp_path_factory.mktemp("peft")
    base = build_tiny_base(root / "tiny")
    names = ("billing", "general")
    return base, {n: build_adapter(base, root / n, seed=i) for i, n in enumerate(names, 1)}


@pytest.fixture
def env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], peft: tuple[Path, dict[str, Path]]
) -> tuple[Cli, RoutedModelStore, int]:
    """Tenants acme (adapters billing and general on base tiny) and beta (none); the CLI
    on their registry, and the routed-model store to check what it wrote."""
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "blobs"))
    acme = registry.create_tenant("acme", OPERATOR).id
    registry.create_tenant("beta", OPERATOR)
    assert acme is not None
    base, adapters = peft
    registry.register_base(base, "tiny", "r1", OPERATOR)
    for name, path in adapters.items():
        registry.push_adapter(acme, name, path, "tiny", OPERATOR)
    return Cli(tmp_path, capsys), RoutedModelStore(registry), acme


def _file(cli: Cli, name: str, content: Any) -> str:
    path = cli.home / name
    text = content if isinstance(content, str) else json.dumps(content)
    path.write_text(text, encoding="utf-8")
    return str(path)


def _suite(cli: Cli, lines: list[dict[str, Any]]) -> str:
    return _file(cli, "suite.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n")


def _save_desk(cli: Cli, policy: dict[str, Any] = RULES) -> str:
    """Save ``policy`` as acme's routed model desk; the policy file's path."""
    path = _file(cli, "desk.json", policy)
    cli.ok("routed-models", "save", "desk", "--policy", path, *ACME)
    return path


def _rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.strip()]


def test_save_list_show_promote_rollback_delete(env: tuple[Cli, RoutedModelStore, int]) -> None:
    cli, store, acme = env
    policy = _file(cli, "policy.json", RULES)
    saved = cli.ok("routed-models", "save", "desk", "--policy", policy, *ACME)
    assert saved == "desk: version 1 saved; it is live\n"
    saved = cli.ok("routed-models", "save", "desk", "--policy", policy, "--description",
                   "same rules", *ACME)  # fmt: skip
    assert saved.splitlines() == [
        "desk: version 2 saved; not live yet",
        "promote it: loraplex routed-models promote desk 2 --tenant acme",
    ]
    assert _rows(cli.ok("routed-models", "list", *ACME)) == [
        ["NAME", "LIVE", "LATEST", "GATES"],
        ["desk", "1", "2", "-"],
    ]
    shown = cli.ok("routed-models", "show", "desk", *ACME).splitlines()
    assert shown[:3] == [
        "routed model  desk",
        "live          version 1 (latest 2)",
        "gates         none",
    ]
    versions = _rows("\n".join(shown[3:]))
    assert versions[0] == ["VERSION", "LIVE", "CREATED_BY", "CREATED", "DESCRIPTION"]
    # The live marker's column is blank for version 2 (split drops it).
    assert (versions[1][:2], versions[1][-1], versions[2][0]) == (["1", "*"], "-", "2")
    assert versions[2][1].startswith("cli:") and versions[2][-2:] == ["same", "rules"]
    as_json = json.loads(cli.ok("routed-models", "show", "desk", "--json", *ACME))
    assert (as_json["live_version"], [v["live"] for v in as_json["versions"]]) == (1, [True, False])
    assert as_json["versions"][0]["policy"] == store.version(acme, "desk", 1).policy
    listed = json.loads(cli.ok("routed-models", "list", "--json", *ACME))
    assert [m["name"] for m in listed["data"]] == ["desk"]

    assert cli.ok("routed-models", "promote", "desk", "2", *ACME) == "desk: live -> version 2\n"
    assert cli.ok("routed-models", "rollback", "desk", *ACME) == (
        "desk: rolled back; live -> version 1\n"
    )
    promoted = cli.ok("routed-models", "save", "desk", "--policy", policy, "--promote", *ACME)
    assert promoted.splitlines() == [
        "desk: version 3 saved; not live yet",
        "desk: live -> version 3",
    ]
    live = store.live(acme, "desk")
    assert live is not None and live.version == 3
    assert cli.ok("routed-models", "delete", "desk", *ACME).startswith("desk: deleted")
    assert _rows(cli.ok("routed-models", "list", *ACME)) == [["NAME", "LIVE", "LATEST", "GATES"]]
    code, _, err = cli("routed-models", "rollback", "desk", *ACME)
    assert (code, err) == (
        1,
        "loraplex: routed model 'desk' does not exist; list your routed models to see the names\n",
    )


def test_an_invalid_policy_prints_every_problem_and_writes_nothing(
    env: tuple[Cli, RoutedModelStore, int],
) -> None:
    cli, store, acme = env
    bad = {"default": "", "rules": [{"target": "billing", "pattern": "("}], "extra": 1}
    code, out, err = cli("routed-models", "save", "desk", "--policy", _file(cli, "p.json", bad),
                         *ACME)  # fmt: skip
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert lines[0].startswith("loraplex: invalid routing policy in ")
    assert len(lines) == 4 and all(line.startswith("  - ") for line in lines[1:])
    assert "unknown field 'extra'" in err and "default must name" in err
    assert "not a valid regular expression" in err
    code, _, err = cli("routed-models", "save", "desk", "--policy", _file(cli, "p.json", "{"),
                       *ACME)  # fmt: skip
    assert code == 2 and "is not JSON" in err
    code, _, err = cli("routed-models", "save", "desk", "--policy", str(cli.home / "none"), *ACME)
    assert code == 2 and "cannot read the policy file" in err
    # A valid policy that the registry refuses: a reference the tenant does not have.
    ghost = _file(cli, "ghost.json", {"default": "ghost"})
    code, _, err = cli("routed-models", "save", "desk", "--policy", ghost, *ACME)
    assert code == 1 and "references 'ghost'" in err
    assert store.list(acme) == []


def test_eval_records_accuracy_and_the_confusion_matrix(
    env: tuple[Cli, RoutedModelStore, int],
) -> None:
    cli, store, acme = env
    _save_desk(cli)
    suite = _suite(cli, [
        {"messages": [{"role": "user", "content": "where is my invoice?"}], "expected": "billing"},
        {"prompt": "a refund please", "expected": "billing"},
        {"prompt": "hello", "metadata": {"team": "support"}, "expected": "general"},
        {"prompt": "hello", "user": "u1", "expected": "general"},  # the default answers: tiny
    ])  # fmt: skip
    out = cli.ok("routed-models", "eval", "desk", "1", "--suite-file", suite, *ACME)
    lines = out.splitlines()
    assert lines[0] == "desk version 1: routing accuracy 0.750 on 4 examples (recorded)"
    assert _rows("\n".join(lines[1:])) == [
        ["EXPECTED\\CHOSEN", "billing", "general", "tiny"],
        ["billing", "2", "0", "0"],
        ["general", "0", "1", "1"],
    ]
    (recorded,) = store.evals(acme, "desk")
    assert (recorded.accuracy, recorded.examples, recorded.suite) == (0.75, 4, "routing")
    assert recorded.confusion == {"billing": {"billing": 2}, "general": {"general": 1, "tiny": 1}}
    cli.ok("routed-models", "eval", "desk", "1", "--suite-file", suite, "--suite", "smoke", *ACME)

    evals = _rows(cli.ok("routed-models", "evals", "desk", *ACME))
    assert evals[0] == ["VERSION", "SUITE", "ACCURACY", "EXAMPLES", "CREATED", "CREATED_BY"]
    assert [r[:4] for r in evals[1:]] == [
        ["1", "routing", "0.750", "4"],
        ["1", "smoke", "0.750", "4"],
    ]
    as_json = json.loads(cli.ok("routed-models", "evals", "desk", "--json", *ACME))
    assert [e["suite"] for e in as_json["data"]] == ["routing", "smoke"]
    shown = cli.ok("routed-models", "show", "desk", *ACME).splitlines()
    assert shown[4].split()[4:6] == ["routing", "smoke"] and "0.750 (4)" in shown[5]


def test_eval_refuses_a_bad_suite_file_and_records_nothing(
    env: tuple[Cli, RoutedModelStore, int],
) -> None:
    cli, store, acme = env
    _save_desk(cli)
    suite = _file(cli, "bad.jsonl", '{"prompt": "x"}\n\nnot json\n[1]\n{"prompt": "x", '
                  '"messages": [], "expected": "tiny"}\n')  # fmt: skip
    code, _, err = cli("routed-models", "eval", "desk", "1", "--suite-file", suite, *ACME)
    assert code == 2 and err.startswith("loraplex: invalid suite file ")
    assert [line.split(":")[0] for line in err.splitlines()[1:]] == [
        "  - line 1", "  - line 3", "  - line 4", "  - line 5",
    ]  # fmt: skip
    assert 'needs "expected"' in err and "exactly one of" in err
    code, _, err = cli("routed-models", "eval", "desk", "1", "--suite-file", _file(cli, "e", ""),
                       *ACME)  # fmt: skip
    assert code == 2 and "no examples" in err
    code, _, err = cli("routed-models", "eval", "desk", "7", "--suite-file", suite, *ACME)
    assert code == 1 and "has no version 7" in err
    assert store.evals(acme, "desk") == []


def test_eval_refuses_a_policy_with_a_classifier(env: tuple[Cli, RoutedModelStore, int]) -> None:
    cli, store, acme = env
    _save_desk(cli, CLASSIFIER)
    suite = _suite(cli, [{"prompt": "invoice", "expected": "billing"}])
    code, out, err = cli("routed-models", "eval", "desk", "1", "--suite-file", suite, *ACME)
    assert (code, out) == (2, "")
    assert "classifier decisions need an engine" in err
    assert "POST /v1/routed_models/desk/versions/1/evals" in err
    assert store.evals(acme, "desk") == []


def test_gates_refuse_a_promote_until_an_eval_passes(
    env: tuple[Cli, RoutedModelStore, int],
) -> None:
    cli, store, acme = env
    policy = _save_desk(cli)
    assert cli.ok("routed-models", "gates", "desk", *ACME) == (
        "desk: no gates (promote needs no routing eval)\n"
    )
    gates = cli.ok("routed-models", "gates", "desk", "--min-accuracy", "0.9", *ACME)
    assert _rows(gates) == [["SUITE", "MIN_ACCURACY", "MAX_REGRESSION"], ["routing", "0.9", "-"]]
    cli.ok("routed-models", "gates", "desk", "--suite", "smoke", "--max-regression", "0.1", *ACME)
    assert "routing: min_accuracy 0.9; smoke: max_regression 0.1" in cli.ok(
        "routed-models", "list", *ACME
    )
    code, out, err = cli("routed-models", "save", "desk", "--policy", policy, "--promote", *ACME)
    assert code == 1 and out == "desk: version 2 saved; not live yet\n"
    assert err.startswith("loraplex: promotion refused by gates")
    assert "version 2 has no routing eval on suite 'routing'" in err
    suite = _suite(cli, [{"prompt": "invoice", "expected": "billing"},
                         {"prompt": "hi", "expected": "general"}])  # fmt: skip
    cli.ok("routed-models", "eval", "desk", "2", "--suite-file", suite, *ACME)  # 0.5
    code, _, err = cli("routed-models", "promote", "desk", "2", *ACME)
    assert code == 1 and "accuracy 0.5 misses the minimum 0.9" in err
    assert store.get(acme, "desk").live_version == 1
    code, _, err = cli("routed-models", "gates", "desk", "--clear", "--min-accuracy", "1", *ACME)
    assert code == 2 and "not both" in err
    code, _, err = cli("routed-models", "gates", "desk", "--min-accuracy", "2", *ACME)
    assert code == 1 and "outside [0, 1]" in err
    kept = cli.ok("routed-models", "gates", "desk", "--clear", "--suite", "smoke", *ACME)
    assert _rows(kept)[1:] == [["routing", "0.9", "-"]]
    assert cli.ok("routed-models", "promote", "desk", "2", "--override", *ACME) == (
        "desk: live -> version 2\n"
    )
    cli.ok("routed-models", "gates", "desk", "--clear", *ACME)
    assert store.get(acme, "desk").gates == []


def test_another_tenants_routed_model_answers_like_an_unknown_one(
    env: tuple[Cli, RoutedModelStore, int],
) -> None:
    cli, _, _ = env
    policy = _save_desk(cli)
    suite = _suite(cli, [{"prompt": "invoice", "expected": "billing"}])
    beta = ("--tenant", "beta")
    for verb in (["show"], ["promote", "1"], ["delete"], ["evals"],
                 ["eval", "1", "--suite-file", suite]):  # fmt: skip
        foreign = cli("routed-models", verb[0], "desk", *verb[1:], *beta)
        unknown = cli("routed-models", verb[0], "nobody", *verb[1:], *beta)
        assert foreign == (unknown[0], unknown[1], unknown[2].replace("nobody", "desk")), verb
        assert foreign[0] == 1 and "routed model 'desk' does not exist" in foreign[2]
    assert _rows(cli.ok("routed-models", "list", *beta)) == [["NAME", "LIVE", "LATEST", "GATES"]]
    # beta's own routed model may not reference acme's adapters: as unknown as any name.
    code, _, err = cli("routed-models", "save", "desk", "--policy", policy, *beta)
    assert code == 1 and "references 'billing', 'general'" in err
    code, _, err = cli("routed-models", "list", "--tenant", "ghost")
    assert code == 1 and "tenant 'ghost' does not exist" in err
