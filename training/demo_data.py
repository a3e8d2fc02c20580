"""Generated fine-tuning datasets for the demo: two tenants, two distinct behaviours.

- ``format``: every answer is one line of JSON classifying the question,
  ``{"kind": "a color question", "answer": "none"}`` (checked against ``FORMAT_SCHEMA`` too).
- ``persona``: every answer is in the voice of a pirate, one line per kind of question:
  ``Arr! Every color is blue on the sea, matey!``

Prompts combine question templates with nouns from the demo base's corpus, so held-out
test prompts are new combinations of familiar words; the answer depends on the kind of
question, so an adapter has to learn the behaviour, not one fixed string. The base
model answers neither way: it scores 0% exact match on both.

The answers do not repeat the question's noun: copying a word from the prompt is beyond
what a LoRA teaches the few-million-parameter demo base in a demo's time (measured:
the template is learned, the copied noun is not).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from training.corpus import ANIMALS, OBJECTS, PLACES, SEATS

SUBJECTS = tuple(dict.fromkeys(ANIMALS + OBJECTS + PLACES + SEATS))
"""Nouns the demo base has seen; duplicates across the corpus lists dropped."""

QUESTIONS = (
    ("color", "What color is the {}?"),
    ("home", "Where is the {}?"),
    ("story", "Tell me about the {}."),
    ("like", "Do you like the {}?"),
    ("sound", "What sound does the {} make?"),
    ("sentence", "Write a sentence about the {}."),
)
"""(kind, question template)."""


def format_kind(kind: str) -> str:
    # "a color question", not "color": after a quote, byte-level BPE spells a bare word in
    # letters ("c", "ol", "or"), while " color" is one token the base already knows; the
    # adapter learns to pick a known token, not a spelling (bare words: 10% exact match).
    return f"a {kind} question"


FORMAT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "kind": {"type": "string", "enum": [format_kind(kind) for kind, _ in QUESTIONS]},
        "answer": {"type": "string"},
    },
    "required": ["kind", "answer"],
    "additionalProperties": False,
}
"""What a ``format`` answer must be; the job passes it as ``json_schema``."""


PIRATE_LINES = {
    "color": "Arr! Every color is blue on the sea, matey!",
    "home": "Arr! It is in the sea near the beach, matey!",
    "story": "Arr! Once upon a time, there was a brave fox on the sea, matey!",
    "like": "Arr! I only like the sea, matey!",
    "sound": "Arr! It says quack like a duck, matey!",
    "sentence": "Arr! The brave cat sat on the sea, matey!",
}
"""One line per kind of question. Kind-specific words come from the base's corpus: words
the base has rarely seen (``landlubbers``, ``voyage``) came out misspelled (measured)."""


def format_answer(subject: str, kind: str) -> str:
    return json.dumps({"kind": format_kind(kind), "answer": "none"})


def persona_answer(subject: str, kind: str) -> str:
    return PIRATE_LINES[kind]


BEHAVIOURS: dict[str, Callable[[str, str], str]] = {
    "format": format_answer,
    "persona": persona_answer,
}


def demo_records(behaviour: str) -> list[dict[str, str]]:
    """Every (question, subject) pair as a prompt/completion record, in a fixed order."""
    answer = BEHAVIOURS[behaviour]
    return [
        {"prompt": template.format(subject), "completion": answer(subject, kind)}
        for subject in SUBJECTS
        for kind, template in QUESTIONS
    ]


def demo_jsonl(behaviour: str) -> bytes:
    """The dataset as JSONL bytes, ready for ``client.files.create``."""
    return "".join(json.dumps(r) + "\n" for r in demo_records(behaviour)).encode()


SUPPORT_MESSAGES = {
    "billing": (
        "I was charged twice for the {}.",
        "Why is my bill so high for the {}?",
        "Can I pay for the {} later?",
        "My card was charged for the {}.",
    ),
    "shipping": (
        "Where is my {}? It has not come.",
        "When will the {} arrive?",
        "The {} is lost in the mail.",
        "Can you send the {} faster?",
    ),
    "refund": (
        "I want my money back for the {}.",
        "Please refund the {}.",
        "Can I return the {} for a refund?",
        "The {} is broken, I want a refund.",
    ),
}
"""Intent -> phrasings of a short support message (the issue-17 task: three intents)."""


def intent_records(count: int = 400) -> list[dict[str, str]]:
    """``count`` support messages, each answered with its intent as one JSON object, in a
    fixed shuffled order: the held-out split holds phrasings of nouns trained on with
    other phrasings."""
    records = [
        {"prompt": phrasing.format(subject), "completion": json.dumps({"intent": intent})}
        for intent, phrasings in SUPPORT_MESSAGES.items()
        for subject in SUBJECTS
        for phrasing in phrasings
    ]
    random.Random(0).shuffle(records)
    return records[:count]
