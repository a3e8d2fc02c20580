"""The data audit of dataset versions: duplicates, blank answers, lengths and leakage."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from training.data import load_jsonl, split_of
from training.dataset_audit import FRACTIONS, audit

REPO = Path(__file__).resolve().parents[2]


def chat(question: str, answer: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def split(example: dict[str, Any]) -> str:
    return split_of(load_jsonl(json.dumps(example))[0], FRACTIONS)


def distinct(n: int) -> list[dict[str, Any]]:
    return [chat(f"What is {i} plus {i}?", f"{2 * i}") for i in range(n)]


def straddling_pair() -> tuple[dict[str, Any], dict[str, Any]]:
    """The same question with two answers, the first trained on, the second held out."""
    for i, j in itertools.product(range(200), range(200)):
        first = chat("How do I reset my password?", f"Open settings, step {i}.")
        second = chat("How do I reset my password?", f"Open settings, then step {j}.")
        if split(first) == "train" and split(second) != "train":
            return first, second
    raise AssertionError("no straddling pair in 40,000 tries: the split is broken")


def test_clean_data_has_no_leakage_duplicates_or_blanks() -> None:
    report = audit(distinct(50))
    assert report["examples"] == 50 and report["formats"] == {"chat": 50}
    assert sum(report["splits"].values()) == 50
    assert report["leakage"] == {"groups": 0, "examples": 0, "sample": [], "held_out_examples": 0}
    assert report["near_duplicates"]["groups"] == 0
    assert report["exact_duplicates"]["groups"] == 0
    assert report["blank_answers"] == {"count": 0, "sample": []}
    assert report["invalid"] == {"count": 0, "sample": []}


def test_a_near_duplicate_pair_straddling_splits_is_leakage() -> None:
    first, second = straddling_pair()
    examples = [*distinct(10), first, *distinct(3), second]
    report = audit(examples)
    leak = report["leakage"]
    assert (leak["groups"], leak["examples"], leak["held_out_examples"]) == (1, 2, 1)
    assert leak["sample"] == [{"positions": [10, 14], "splits": ["train", split(second)]}]


def test_near_duplicates_share_a_split_so_they_are_not_leakage() -> None:
    examples = [chat("Hello there", "Hi!"), chat("hello,   THERE", "hi"), *distinct(5)]
    report = audit(examples)
    assert report["near_duplicates"] == {"groups": 1, "examples": 2, "sample": [[0, 1]]}
    assert report["leakage"]["groups"] == 0


def test_blank_answers_and_lengths() -> None:
    examples = [
        chat("abc", ""),
        {"prompt": "123456", "completion": "   "},
        chat("x" * 9, "y" * 21),
    ]
    report = audit(examples)
    assert report["blank_answers"] == {"count": 2, "sample": [0, 1]}
    chars = report["length"]["chars"]
    assert (chars["total"], chars["min"], chars["max"], chars["p50"]) == (42, 3, 30, 9)
    tokens = report["length"]["estimated_tokens"]
    assert (tokens["min"], tokens["max"], tokens["total"]) == (1, 10, 1 + 3 + 10)


def test_an_invalid_record_is_reported_by_position_and_the_rest_audited() -> None:
    report = audit([*distinct(2), {"messages": []}, chat("Hi", "")])
    assert report["invalid"]["count"] == 1 and report["invalid"]["sample"] == [2]
    assert "position 2" in report["invalid"]["problems"][0]
    assert report["blank_answers"]["sample"] == [3]


def test_no_examples() -> None:
    report = audit([])
    assert report["examples"] == 0 and report["length"]["chars"]["min"] is None


def test_importing_the_audit_loads_no_torch_or_tokenizer() -> None:
    code = "import sys, training.dataset_audit; print(' '.join(sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    heavy = {m.split(".")[0] for m in loaded} & {"torch", "transformers", "numpy", "peft"}
    assert heavy == set()
