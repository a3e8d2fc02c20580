"""Rendering with the base's chat template: answer-only labels, inference-identical prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tests.training.training_testdata import chat_records, jsonl
from training.data import load_jsonl
from training.demo_tokenizer import END_OF_TURN_TOKEN
from training.render import IGNORE_INDEX, TemplateError, tokenize_example


@pytest.fixture(scope="module")
def tokenizer(chat_base: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(chat_base)


def _supervised_text(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int]) -> str:
    return str(
        tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    )


def test_prompt_tokens_are_exactly_what_the_engine_sees(tokenizer: PreTrainedTokenizerBase) -> None:
    example = load_jsonl(jsonl([{"prompt": "What color is the sky?", "completion": "Blue."}]))[0]
    tokens = tokenize_example(tokenizer, example, 256)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What color is the sky?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    # How vLLM tokenizes a chat request: the rendered text, no extra special tokens.
    engine_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokens.input_ids[: len(engine_ids)] == engine_ids
    assert set(tokens.labels[: len(engine_ids)]) == {IGNORE_INDEX}
    assert tokens.labels[len(engine_ids) :] == tokens.input_ids[len(engine_ids) :]
    assert (
        _supervised_text(tokenizer, tokens.input_ids, tokens.labels) == f"Blue.{END_OF_TURN_TOKEN}"
    )


def test_every_assistant_turn_is_supervised_and_nothing_else(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye!"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    }
    tokens = tokenize_example(tokenizer, load_jsonl(jsonl([record]))[0], 256)
    supervised = _supervised_text(tokenizer, tokens.input_ids, tokens.labels)
    assert supervised == f"Hello.{END_OF_TURN_TOKEN}Goodbye.{END_OF_TURN_TOKEN}"
    whole = tokenizer.decode(tokens.input_ids)
    assert whole == tokenizer.apply_chat_template(record["messages"], tokenize=False)


def test_cutting_to_max_length_is_reported(tokenizer: PreTrainedTokenizerBase) -> None:
    example = load_jsonl(jsonl(chat_records(1)))[0]
    tokens = tokenize_example(tokenizer, example, 8)
    assert tokens.truncated and len(tokens.input_ids) == 8
    assert not tokenize_example(tokenizer, example, 256).truncated


def test_chat_records_need_a_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    with pytest.raises(TemplateError, match="has no chat template"):
        tokenize_example(plain, load_jsonl(jsonl(chat_records(1)))[0], 64)
    completion = load_jsonl(jsonl([{"prompt": "Say yes.", "completion": " yes"}]))[0]
    tokens = tokenize_example(plain, completion, 64)
    assert tokens.input_ids[0] == plain.bos_token_id
    assert _supervised_text(plain, tokens.input_ids, tokens.labels) == f" yes{plain.eos_token}"
