"""Shared builders for training tests: a tiny chat base model and small JSONL datasets."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.demo_base import DemoBaseConfig, build_demo_base

TINY_BASE = DemoBaseConfig.tiny()
"""A one-layer demo base (byte-level BPE, Llama 3 chat template), built in well under a second."""

FAST = TrainConfig(
    learning_rate=1e-2,
    epochs=4,
    batch_size=8,
    eval_every=4,
    max_length=64,
    num_threads=1,
    target_modules=("q_proj", "v_proj", "o_proj", "down_proj"),
)
"""Few quick steps at a large learning rate: enough to lower the tiny base's loss clearly
(its untrained output layer keeps it from exact answers; the demo base reaches those)."""


def build_tiny_chat_base(dest: Path) -> Path:
    return build_demo_base(dest, TINY_BASE, progress=False)


def jsonl(records: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def fixed_answer_records(count: int, answer: str = "Banana.") -> list[dict[str, Any]]:
    """Prompt/completion pairs that all want the same answer, numbered as the question: a
    trivially learnable task. The numbers make every answer distinct, so loss, not exact
    match (which the tiny base never reaches), decides promotion (``training.promotion``)."""
    return [{"prompt": f"Question number {i}: what do you say?", "completion": f"{answer} {i}"}
            for i in range(count)]  # fmt: skip


def chat_records(count: int, answer: str = "Banana.") -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Tell me thing {i}."},
                {"role": "assistant", "content": answer},
            ]
        }
        for i in range(count)
    ]


def preference_records(count: int) -> list[dict[str, Any]]:
    return [
        {"prompt": f"Question {i}?", "chosen": "Banana.", "rejected": "Apple."}
        for i in range(count)
    ]
