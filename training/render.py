"""Turning examples into token ids with the base model's own chat template, and labels.

The prompt and each answer are tokenized separately and concatenated, because that is
what happens at inference: the engine tokenizes the rendered prompt (generation prompt
included) and the model continues it token by token. Tokenizing the whole rendered
conversation at once can merge tokens across the prompt/answer boundary (byte-level BPE
merges the template's trailing newlines with the answer's first word), which would
teach the model token sequences it never sees when serving.

Only answer tokens (assistant turns, completions, including the end-of-turn token that
makes the model stop) carry labels; everything else is ``IGNORE_INDEX``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from training.data import Example, Message

IGNORE_INDEX = -100
"""Label of tokens the loss skips (PyTorch's cross-entropy default)."""


class TemplateError(ValueError):
    """The base model's tokenizer cannot render these examples as training data."""


@dataclass(frozen=True)
class Tokenized:
    """One supervised example as the model sees it."""

    input_ids: list[int]
    labels: list[int]
    """``input_ids`` where the loss applies, ``IGNORE_INDEX`` elsewhere."""
    truncated: bool = False
    """True when the example was cut to the maximum length."""

    @property
    def supervised_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class Turn:
    """A prompt as rendered text and the answer that should follow it."""

    prompt_text: str
    answer_text: str
    """The rendered continuation (answer plus the template's end-of-turn markup)."""
    answer: str
    """The bare answer content, as exact match compares it."""


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=prompt
    )
    return str(text)


def turn(tokenizer: PreTrainedTokenizerBase, history: Sequence[Message], answer: str) -> Turn:
    """Render ``history`` as a prompt and ``answer`` as the assistant's reply to it."""
    if not has_chat_template(tokenizer):
        if len(history) != 1 or history[0]["role"] != "user":
            raise TemplateError(
                "the base model's tokenizer has no chat template, so it cannot render chat "
                "messages; give prompt/completion records, or use a base with a chat template"
            )
        eos = tokenizer.eos_token or ""
        return Turn(history[0]["content"], answer + eos, answer)
    prompt_text = _render(tokenizer, history, prompt=True)
    full = _render(tokenizer, [*history, {"role": "assistant", "content": answer}], prompt=False)
    if not full.startswith(prompt_text):
        raise TemplateError(
            "the chat template renders a conversation differently from its own prompt "
            "(the generation prompt is not a prefix of the answered conversation), so answer "
            "tokens cannot be located; use a base whose template is prefix-stable"
        )
    return Turn(prompt_text, full[len(prompt_text) :], answer.strip())


def _user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def _as_messages(prompt: Any) -> list[Message]:
    return _user(prompt) if isinstance(prompt, str) else list(prompt)


def _as_answer(value: Any) -> str:
    return value if isinstance(value, str) else str(value["content"])


def _final(example: Example) -> tuple[list[Message], str]:
    """The history before an example's last answer, and that answer."""
    data = example.data
    if example.format == "completion":
        return _user(data["prompt"]), data["completion"]
    if example.format == "preference":
        return _as_messages(data["prompt"]), _as_answer(data["chosen"])
    messages: list[Message] = data["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def reference_answer(example: Example) -> str:
    """The answer evaluation expects for an example, trimmed as exact match compares it."""
    return _final(example)[1].strip()


def final_turn(tokenizer: PreTrainedTokenizerBase, example: Example) -> Turn:
    """The last answer of an example and its prompt: what evaluation asks and expects."""
    return turn(tokenizer, *_final(example))


def preference_turns(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[Turn, Turn]:
    """The chosen and the rejected answer to the same prompt."""
    history = _as_messages(example.data["prompt"])
    return (
        turn(tokenizer, history, _as_answer(example.data["chosen"])),
        turn(tokenizer, history, _as_answer(example.data["rejected"])),
    )


def _segments(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[tuple[str, bool]]:
    """The example's text as (piece, is_supervised), in order."""
    if example.format != "chat":
        rendered = final_turn(tokenizer, example)
        return [(rendered.prompt_text, False), (rendered.answer_text, True)]
    messages: list[Message] = example.data["messages"]
    if not has_chat_template(tokenizer):
        raise TemplateError(
            "the base model's tokenizer has no chat template, so it cannot render 'messages' "
            "records; give prompt/completion records, or use a base with a chat template"
        )
    segments: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        rendered = turn(tokenizer, messages[:index], message["content"])
        if not rendered.prompt_text.startswith(done):
            raise TemplateError(
                "the chat template renders earlier turns differently once later turns are "
                "added, so answer tokens cannot be located; use a prefix-stable template"
            )
        segments.append((rendered.prompt_text[len(done) :], False))
        segments.append((rendered.answer_text, True))
        done = rendered.prompt_text + rendered.answer_text
    return segments


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str, first: bool) -> list[int]:
    """Token ids of one piece; a chat template already carries bos, plain text gets it."""
    special = first and not has_chat_template(tokenizer)
    ids: list[int] = tokenizer(text, add_special_tokens=special)["input_ids"]
    return ids


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int
) -> Tokenized:
    """Input ids and answer-only labels, cut to ``max_length`` tokens."""
    input_ids: list[int] = []
    labels: list[int] = []
    for index, (piece, supervised) in enumerate(_segments(tokenizer, example)):
        ids = tokenize_text(tokenizer, piece, first=index == 0)
        input_ids.extend(ids)
        labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))
    truncated = len(input_ids) > max_length
    return Tokenized(input_ids[:max_length], labels[:max_length], truncated)


def tokenize_turn(tokenizer: PreTrainedTokenizerBase, rendered: Turn, max_length: int) -> Tokenized:
    """One prompt + answer as ids with answer-only labels (for DPO and test-set loss)."""
    prompt = tokenize_text(tokenizer, rendered.prompt_text, first=True)
    answer = tokenize_text(tokenizer, rendered.answer_text, first=False)
    ids, labels = prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
    return Tokenized(ids[:max_length], labels[:max_length], len(ids) > max_length)
