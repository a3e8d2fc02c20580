"""The demo loop's data and table helpers (``server.dev.demo_loop``); the turn itself runs
against a real server in ``make demo``."""

from __future__ import annotations

import json

import pytest

from server.dev.demo_loop import (
    INTENTS,
    MISSING,
    Answer,
    audit_line,
    chat_jsonl,
    counter_values,
    intent_of,
    loop_rows,
    markdown_table,
    one_per_intent,
    percent,
    side_by_side,
    split_records,
)
from training.data import load_jsonl
from training.dataset_audit import audit
from training.demo_data import intent_records


def _record(prompt: str, intent: str) -> dict[str, str]:
    return {"prompt": prompt, "completion": json.dumps({"intent": intent})}


def test_intent_of_reads_only_an_intent_object() -> None:
    assert intent_of('{"intent": "refund"}') == "refund"
    assert intent_of('{"intent": 3}') is None
    assert intent_of('["refund"]') is None
    assert intent_of("refund") is None
    assert intent_of(None) is None


def test_splits_are_disjoint_and_v1_never_sees_the_missing_intent() -> None:
    sizes = {"held_out": 10, "live": 20, "shadow": 8, "after": 20}
    splits = split_records(intent_records(10_000), sizes, v1_per_intent=50)
    sets = {name: [r["prompt"] for r in rows] for name, rows in vars(splits).items()}
    every = [p for prompts in sets.values() for p in prompts]
    assert len(every) == len(set(every))
    assert {intent_of(r["completion"]) for r in splits.v1_train} == set(INTENTS) - {MISSING}
    assert len(splits.v1_train) == 50 * (len(INTENTS) - 1)
    for name, size in sizes.items():
        intents = [str(intent_of(r["completion"])) for r in getattr(splits, name)]
        assert sorted(intents) == sorted(list(INTENTS) * size), name


def test_splits_refuse_an_intent_with_too_few_messages() -> None:
    records = [_record(f"bill {i}", "billing") for i in range(5)]
    with pytest.raises(ValueError, match="'billing' has 5 messages"):
        split_records(records, {"live": 3}, v1_per_intent=3)


def test_chat_jsonl_is_a_valid_fine_tuning_file_of_chat_examples() -> None:
    records = [_record("Please refund the cat.", "refund"), _record("Where is my owl?", "shipping")]
    examples = load_jsonl(chat_jsonl(records), "training_file")
    assert [e.data["messages"][-1]["content"] for e in examples] == [
        r["completion"] for r in records
    ]
    assert examples[0].data["messages"][0] == {"role": "user", "content": "Please refund the cat."}


def test_audit_line_names_the_reports_counts() -> None:
    lines = chat_jsonl([_record("a b c", "billing")] * 2).splitlines()
    examples = [json.loads(line) for line in lines]
    line = audit_line(audit(examples))
    assert line.startswith("2 examples, exact duplicates 1,")
    assert "blank answers 0" in line
    assert audit_line({"error": "the data audit failed"}) == "the data audit failed"


def test_percent() -> None:
    assert percent(None) == "-"
    assert percent(0.6667) == "67 %"
    assert percent(1.0, 60) == "100 % of 60"


def test_tables_align_and_escape() -> None:
    rows = [("held-out", "67 %", "100 %"), ("a|b", "x", "-")]
    text = side_by_side(rows, ("", "v1", "v2")).splitlines()
    assert len({line.index("67 %") if "67 %" in line else None for line in text} - {None}) == 1
    assert text[1].strip().startswith("--------")
    assert markdown_table(rows, ("", "v1", "v2")).splitlines()[3] == "| a\\|b | x | - |"


def _answers(texts: list[str]) -> list[Answer]:
    return [
        Answer(_record(f"message {i}", INTENTS[i % 3]), text, f"chatcmpl-{i}")
        for i, text in enumerate(texts)
    ]


def test_loop_rows_show_stored_values_and_one_answer_per_intent() -> None:
    right = [json.dumps({"intent": INTENTS[i % 3]}) for i in range(6)]
    weak = [*right[:2], json.dumps({"intent": "billing"}), *right[3:5], "{}"]
    values = {1: {"held-out/exact_match": 0.5}, 2: {"held-out/exact_match": 1.0}}
    rows = loop_rows(values, {1: _answers(weak), 2: _answers(right)}, 1, 2)
    assert rows[0] == ("held-out exact match (stored)", "50 %", "100 %")
    assert ("shadow JSON valid", "-", "-") in rows
    assert one_per_intent(_answers(right)) == [0, 1, 2]
    assert rows[-1] == ("'message 2'", '{"intent": "billing"} ✗', '{"intent": "refund"} ✓')
    assert rows[-3][1].endswith("✓")


def test_counter_values_reads_one_tenants_series() -> None:
    scraped = "\n".join(
        [
            "# TYPE loraplex_shadow_copies_total counter",
            'loraplex_shadow_copies_total{tenant="acme",outcome="answered"} 22.0',
            'loraplex_shadow_copies_total{tenant="acme",outcome="busy"} 2.0',
            'loraplex_shadow_copies_total{tenant="globex",outcome="busy"} 5.0',
            'loraplex_shadow_tokens_total{tenant="acme",kind="prompt"} 300.0',
        ]
    )
    found = counter_values(scraped, "loraplex_shadow_copies_total", "acme")
    assert found == {"answered": 22.0, "busy": 2.0}
