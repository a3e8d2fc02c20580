"""The demo's generated datasets: valid, trainable records whose answers follow the behaviour."""

from __future__ import annotations

import json

import pytest

from training.data import SplitFractions, check_method, load_jsonl, split_examples
from training.demo_data import (
    FORMAT_SCHEMA,
    QUESTIONS,
    SUBJECTS,
    SUPPORT_MESSAGES,
    demo_jsonl,
    demo_records,
    intent_records,
)
from training.schema import is_compliant


@pytest.mark.parametrize("behaviour", ["format", "persona"])
def test_demo_datasets_load_and_hold_out_a_test_split(behaviour: str) -> None:
    examples = load_jsonl(demo_jsonl(behaviour))
    check_method(examples, "supervised")
    assert len(examples) == len(SUBJECTS) * len(QUESTIONS)
    assert len({e.key for e in examples}) == len(examples)
    splits = split_examples(examples, SplitFractions())
    assert len(splits["test"]) >= 15 and len(splits["validation"]) >= 10


def test_format_answers_follow_the_schema_and_name_the_kind() -> None:
    for record in demo_records("format"):
        assert is_compliant(record["completion"], FORMAT_SCHEMA)
    kinds = {json.loads(r["completion"])["kind"] for r in demo_records("format")}
    assert len(kinds) == len(QUESTIONS)
    assert not is_compliant('{"kind": "a color question"}', FORMAT_SCHEMA)  # answer missing


def test_persona_answers_depend_on_the_kind_of_question_only() -> None:
    by_prompt = {r["prompt"]: r["completion"] for r in demo_records("persona")}
    for _, template in QUESTIONS:
        answers = {by_prompt[template.format(subject)] for subject in SUBJECTS}
        assert len(answers) == 1 and answers.pop().startswith("Arr! ")
    assert len(set(by_prompt.values())) == len(QUESTIONS)


def test_intent_records_are_three_intents_over_support_phrasings() -> None:
    records = intent_records()
    assert len(records) == 400 and len({r["prompt"] for r in records}) == 400
    intents = {json.loads(r["completion"])["intent"] for r in records}
    assert intents == set(SUPPORT_MESSAGES) and len(intents) == 3
    assert records == intent_records()  # a fixed order: the same split every run
