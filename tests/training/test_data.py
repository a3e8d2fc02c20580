"""Data loading, refusals with precise messages, the data checks, and the content-keyed split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tests.training.training_testdata import (
    chat_records,
    fixed_answer_records,
    jsonl,
    preference_records,
)
from training.data import (
    DatasetError,
    SplitFractions,
    check_method,
    load_jsonl,
    split_examples,
    split_of,
)
from training.data_checks import check_data, refuse_untrainable


@pytest.fixture(scope="module")
def tokenizer(chat_base: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(chat_base)


def test_the_three_formats_load() -> None:
    examples = load_jsonl(
        jsonl([*chat_records(1), *fixed_answer_records(1), *preference_records(1)])
    )
    assert [e.format for e in examples] == ["chat", "completion", "preference"]
    assert [e.line for e in examples] == [1, 2, 3]


def test_malformed_lines_are_all_refused_with_their_line_numbers() -> None:
    good = json.dumps(fixed_answer_records(1)[0])
    content = "\n".join(
        [
            good,
            '{"prompt": "hi", "completion": ',
            good,
            '{"messages": [{"role": "wizard", "content": "x"}]}',
            '{"prompt": "p", "completion": 7}',
            "[1, 2]",
            '{"text": "free text"}',
        ]
    )
    with pytest.raises(DatasetError) as refused:
        load_jsonl(content, "train.jsonl")
    message = str(refused.value)
    assert "train.jsonl was refused (5 problem(s))" in message
    assert "line 2: invalid JSON" in message
    assert "line 4: messages[0] has role 'wizard'" in message
    assert "line 4: 'messages' has no assistant message" not in message  # role error first
    assert "line 5: 'completion' must be a string, got int" in message
    assert "line 6: expected a JSON object, got list" in message
    assert "line 7: unknown record format (keys: text)" in message
    assert "line 1" not in message and "line 3" not in message


def test_a_chat_without_an_assistant_turn_is_refused() -> None:
    record = {"messages": [{"role": "user", "content": "hello"}]}
    with pytest.raises(DatasetError, match="line 1: 'messages' has no assistant message"):
        load_jsonl(jsonl([record]))


def test_an_empty_file_is_refused() -> None:
    with pytest.raises(DatasetError, match="no examples: the file is empty"):
        load_jsonl(b"\n\n")


def test_a_preference_file_is_refused_for_a_supervised_job() -> None:
    examples = load_jsonl(jsonl(preference_records(3)))
    with pytest.raises(DatasetError) as refused:
        check_method(examples, "supervised", "prefs.jsonl")
    message = str(refused.value)
    assert "prefs.jsonl was refused (3 problem(s))" in message
    assert "line 1: a preference record in a supervised job" in message
    assert "train preference pairs with method 'dpo'" in message


def test_supervised_records_are_refused_for_a_dpo_job() -> None:
    examples = load_jsonl(jsonl(fixed_answer_records(2)))
    with pytest.raises(DatasetError, match="line 2: a completion record in a dpo job"):
        check_method(examples, "dpo")


def test_a_fully_masked_dataset_is_refused(tokenizer: PreTrainedTokenizerBase) -> None:
    # Prompts longer than max_length: cutting leaves no answer token with a label.
    records = [{"prompt": "word " * 80 + str(i), "completion": "Yes."} for i in range(5)]
    examples = load_jsonl(jsonl(records))
    report = check_data(examples, split_examples(examples, SplitFractions()), tokenizer, 32)
    assert report.zero_supervised == [1, 2, 3, 4, 5]
    assert report.over_long == [1, 2, 3, 4, 5]
    assert report.usable == []
    with pytest.raises(DatasetError) as refused:
        refuse_untrainable(report, "supervised")
    assert "every label is masked: 5 example(s) have no supervised token" in str(refused.value)
    assert "lines 1, 2, 3, 4, 5" in str(refused.value)


def test_a_template_that_drops_answers_masks_everything(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}"
        "{% endif %}{% endfor %}"
    )
    examples = load_jsonl(jsonl(chat_records(3)))
    report = check_data(examples, split_examples(examples, SplitFractions()), tokenizer, 64)
    assert report.zero_supervised == [1, 2, 3]
    with pytest.raises(DatasetError, match="every label is masked"):
        refuse_untrainable(report, "supervised")


def test_the_checks_count_duplicates_empty_and_usable(tokenizer: PreTrainedTokenizerBase) -> None:
    records = [
        {"prompt": "What is up?", "completion": "The sky."},
        {"prompt": "What is up?", "completion": "The sky."},  # exact duplicate
        {"prompt": "what  is UP", "completion": "the sky"},  # near duplicate
        {"prompt": "Say nothing.", "completion": "   "},  # empty answer
        {"prompt": "Name a colour.", "completion": "Blue."},
    ]
    examples = load_jsonl(jsonl(records))
    report = check_data(examples, split_examples(examples, SplitFractions()), tokenizer, 64)
    assert report.examples == 5
    assert report.exact_duplicates == [2]
    assert report.near_duplicates == [3]
    assert report.empty == [4]
    assert report.usable == [1, 2, 3, 5]
    assert report.supervised_tokens > 0
    assert sum(report.splits.values()) == 5
    assert "2 exact" not in report.summary() and "1 exact and 1 near" in report.summary()


def test_an_example_never_moves_split_when_the_dataset_grows() -> None:
    fractions = SplitFractions(validation=0.2, test=0.2)
    small = load_jsonl(jsonl(fixed_answer_records(200)))
    grown = load_jsonl(jsonl(fixed_answer_records(1000)))
    before = {e.key: split_of(e, fractions) for e in small}
    after = {e.key: split_of(e, fractions) for e in grown}
    assert all(after[key] == split for key, split in before.items())
    counts = {name: len(items) for name, items in split_examples(grown, fractions).items()}
    # Hash positions are uniform: each share lands near its fraction.
    assert 150 < counts["test"] < 250 and 150 < counts["validation"] < 250


def test_near_duplicates_share_a_split() -> None:
    fractions = SplitFractions(validation=0.3, test=0.3)
    variants = [{"prompt": f"Question {i}?", "completion": "Yes."} for i in range(50)] + [
        {"prompt": f"question {i}", "completion": "yes"} for i in range(50)
    ]
    examples = load_jsonl(jsonl(variants))
    for a, b in zip(examples[:50], examples[50:], strict=True):
        assert a.key != b.key and a.near_key == b.near_key
        assert split_of(a, fractions) == split_of(b, fractions)
