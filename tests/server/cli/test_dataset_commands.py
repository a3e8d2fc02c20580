"""``loraplex datasets``: datasets and their versions from a shell, on a real registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from registry.datasets import address
from tests.server.cli.harness import Cli


def chat(question: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": "ok"},
        ]
    }


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    made = Cli(tmp_path, capsys)
    made.ok("tenants", "create", "acme")
    return made


def data(tmp_path: Path, name: str, *records: dict[str, Any]) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_datasets_from_a_shell(cli: Cli, tmp_path: Path) -> None:
    t = ("--tenant", "acme")
    assert "loraplex datasets add faq" in cli.ok("datasets", "create", "faq", *t)
    first = data(tmp_path, "one.jsonl", chat("a?"), chat("b?"))
    added = cli.ok("datasets", "add", "faq", *t, "--file", first)
    assert added.startswith("faq version 1: 2 examples (+2 -0)") and "0 leak group(s)" in added
    assert "unchanged, still version 1" in cli.ok("datasets", "add", "faq", *t, "--file", first)
    second = data(tmp_path, "two.jsonl", chat("c?"))
    removed = address(chat("a?"))
    out = cli.ok("datasets", "add", "faq", *t, "--file", second, "--remove", removed)
    assert out.startswith("faq version 2: 2 examples (+1 -1)")
    assert cli.ok("datasets", "list", *t).splitlines()[1].split()[:2] == ["faq", "2"]
    versions = cli.ok("datasets", "versions", "faq", *t).splitlines()
    assert [line.split()[0] for line in versions] == ["VERSION", "1", "2"]
    shown = json.loads(cli.ok("datasets", "show", "faq", *t, "--version", "2"))
    assert shown["diff"] == {"added": 1, "removed": 1} and shown["audit"]["examples"] == 2
    lines = cli.ok("datasets", "examples", "faq", *t, "--limit", "1").splitlines()
    assert [json.loads(line)["example"] for line in lines] == [chat("b?")]


def test_errors_say_what_to_do(cli: Cli, tmp_path: Path) -> None:
    t = ("--tenant", "acme")
    code, _, err = cli(
        "datasets", "add", "nope", *t, "--file", data(tmp_path, "x.jsonl", chat("a"))
    )
    assert code == 1 and "does not exist; list your datasets" in err
    cli.ok("datasets", "create", "faq", *t)
    code, _, err = cli("datasets", "add", "faq", *t)
    assert code == 2 and "give --file" in err
    code, _, err = cli("datasets", "add", "faq", *t, "--file", str(tmp_path / "missing.jsonl"))
    assert code == 1 and "no such file" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": []}\nnot json\n')
    code, _, err = cli("datasets", "add", "faq", *t, "--file", str(broken))
    assert code == 1 and "line 1" in err and "line 2" in err and "fix these" in err
    code, _, err = cli("datasets", "show", "faq", *t)
    assert code == 1 and "has no versions yet" in err
