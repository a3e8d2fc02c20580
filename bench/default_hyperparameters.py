"""What fine-tuning jobs with default ("auto") hyperparameters reach on the demo tasks.

Each task (``training.demo_data``) is trained as a job with every hyperparameter left to
``auto`` would be (``training.auto``: epochs and batch size from the data's size, the
learning rate from a short search) on the demo base, and scored on its own held-out test
split: exact match against the base alone, once per training seed (the tiny demo base
is sensitive to it). Writes
``bench/results/default_hyperparameters.json``.

Run: ``.venv/bin/python -m bench.default_hyperparameters [--tasks format,persona,...]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.gateway import machine
from bench.results import write_result

COMMAND = ".venv/bin/python -m bench.default_hyperparameters"


def _intent_small() -> bytes:
    """The demo loop's v1 data: 152 support messages of two intents (no refund)."""
    from server.dev.demo_loop import chat_jsonl, split_records
    from training.demo_data import intent_records

    return chat_jsonl(split_records(intent_records(10_000)).v1_train)


def _tasks() -> dict[str, Callable[[], bytes]]:
    from server.dev.demo_loop import chat_jsonl
    from training.demo_data import demo_jsonl, intent_records

    return {
        "format": lambda: demo_jsonl("format"),
        "persona": lambda: demo_jsonl("persona"),
        "intent": lambda: chat_jsonl(intent_records(400)),
        "intent-small": _intent_small,
    }


def measure(task: str, data: bytes, base: Path, seed: int = 0) -> dict[str, Any]:
    from training.auto import Auto
    from training.config import TrainConfig
    from training.pipeline import RunSpec, run_training

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loraplex-defaults-") as out:
        spec = RunSpec(base, data, TrainConfig(seed=seed), auto=Auto())
        outcome = run_training(spec, Path(out))
    candidate, alone = outcome.metrics["candidate"], outcome.metrics["base"]
    config = outcome.choice.config
    return {
        "task": task,
        "seed": seed,
        "examples": data.count(b"\n"),
        "picked": {"epochs": config.epochs, "batch_size": config.batch_size,
                   "learning_rate": config.learning_rate},
        "search": outcome.choice.to_json()["search"],
        "exact_match": candidate.exact_match,
        "base_exact_match": alone.exact_match,
        "test_samples": candidate.samples,
        "seconds": round(time.monotonic() - started, 1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from training.demo_base import build_demo_base

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", default=",".join(_tasks()))
    parser.add_argument("--base", type=Path, default=Path(".loraplex/demo-base"))
    parser.add_argument("--seeds", default="0,1,2", help="training seeds per task")
    args = parser.parse_args(argv)
    base = build_demo_base(args.base)
    tasks = _tasks()
    rows = []
    for name in args.tasks.split(","):
        for seed in map(int, args.seeds.split(",")):
            rows.append(measure(name, tasks[name](), base, seed))
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "default_hyperparameters", "command": COMMAND,
              "machine": machine(), "tasks": rows}  # fmt: skip
    print(f"wrote {write_result('default_hyperparameters', result)}")


if __name__ == "__main__":
    main()
