"""``"auto"`` hyperparameters: epochs and batch size from the dataset's size, and the
learning rate from a short search on the validation split.

One default learning rate does not fit every base: the default (2e-4) suits billion-
parameter bases, while the few-million-parameter demo base learned nothing at it in
three epochs (a 3-intent task ended answering one intent to every message). So a job
that leaves the learning rate to ``auto`` first trains a few short runs, one per
multiplier of the default, each from a fresh adapter, and keeps the learning rate whose
run ends with the lowest validation loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.data import Example
from training.recipe import LoRARecipe

SEARCH_MULTIPLIERS = (1.0, 5.0, 25.0)
"""Learning rates tried, as multiples of the configured one."""
SEARCH_STEPS = 24
"""Optimizer steps per search run (fewer when one epoch is shorter)."""
SEARCH_VALIDATION = 64
"""Validation examples a search run is scored on (the first ones: the same for each)."""


@dataclass(frozen=True)
class Auto:
    """Which of OpenAI's hyperparameters a job left to ``auto``."""

    epochs: bool = True
    batch_size: bool = True
    learning_rate: bool = True


@dataclass(frozen=True)
class Picked:
    """The configuration a job trains with, and how its ``auto`` values were picked."""

    config: TrainConfig
    searched: dict[float, float]
    """Validation loss after a short run, per learning rate tried (empty: no search)."""

    def summary(self) -> str:
        picked = f"{self.config.epochs} epochs, batch size {self.config.batch_size}"
        if not self.searched:
            return f"{picked}, learning rate {self.config.learning_rate:g}"
        tried = ", ".join(f"{rate:g} -> {loss:.4f}" for rate, loss in self.searched.items())
        return (
            f"{picked}, learning rate {self.config.learning_rate:g}, the lowest validation "
            f"loss of a {SEARCH_STEPS}-step search ({tried})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "epochs": self.config.epochs,
            "batch_size": self.config.batch_size,
            "learning_rate": self.config.learning_rate,
            "search": [{"learning_rate": r, "valid_loss": v} for r, v in self.searched.items()],
        }


def sized(config: TrainConfig, auto: Auto, examples: int) -> TrainConfig:
    """Epochs and batch size for ``examples`` training examples, where left to auto.

    About 1,200 examples' worth of passes (2 to 6 epochs: small sets need more passes to
    be learned, large ones overfit), and batches that grow with the data so a large set
    does not take a step per handful of examples."""
    overrides: dict[str, Any] = {}
    if auto.epochs:
        overrides["epochs"] = max(2, min(6, math.ceil(1200 / max(1, examples))))
    if auto.batch_size:
        overrides["batch_size"] = 4 if examples < 500 else 8 if examples < 5000 else 16
    return config.with_overrides(overrides) if overrides else config


def search_learning_rate(
    config: TrainConfig,
    base_dir: Path,
    train: Sequence[Example],
    validation: Sequence[Example],
    should_stop: Callable[[], bool] | None = None,
) -> dict[float, float]:
    """Validation loss after ``SEARCH_STEPS`` steps at each multiple of the learning rate."""
    per_epoch = math.ceil(len(train) / (config.batch_size * config.grad_accumulation))
    steps = max(1, min(SEARCH_STEPS, per_epoch))
    losses: dict[float, float] = {}
    for multiplier in SEARCH_MULTIPLIERS:
        rate = config.learning_rate * multiplier
        trial = replace(
            config, learning_rate=rate, epochs=1, max_steps=steps, eval_every=steps,
            schedule="constant", warmup_ratio=0.0,
        )  # fmt: skip
        recipe = LoRARecipe(trial, base_dir, should_stop=should_stop)
        recipe.setup(train, validation[:SEARCH_VALIDATION])
        result = recipe.train()
        losses[rate] = (
            math.inf if result.best_validation_loss is None else result.best_validation_loss
        )
        del recipe  # one copy of the base at a time
    return losses


def choose(
    config: TrainConfig,
    auto: Auto,
    base_dir: Path,
    splits: dict[str, list[Example]],
    should_stop: Callable[[], bool] | None = None,
) -> Picked:
    """The config with its ``auto`` values picked (a search only with validation data)."""
    config = sized(config, auto, len(splits["train"]))
    if not auto.learning_rate or not splits["validation"]:
        return Picked(config, {})
    losses = search_learning_rate(
        config, base_dir, splits["train"], splits["validation"], should_stop
    )
    best = min(losses, key=lambda rate: losses[rate])
    return Picked(replace(config, learning_rate=best), losses)
