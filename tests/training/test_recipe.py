"""The LoRA recipe on a tiny chat base: SFT and DPO learn, best weights kept, servable output."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from tests.training.training_testdata import (
    FAST,
    fixed_answer_records,
    jsonl,
    preference_records,
)
from training.config import ConfigError, TrainConfig
from training.data import Example, SplitFractions, load_jsonl, split_examples
from training.recipe import LoRARecipe, StepReport, TrainingCancelled


def _splits(records: list[dict[str, Any]]) -> dict[str, list[Example]]:
    return split_examples(load_jsonl(jsonl(records)), SplitFractions(0.15, 0.1))


def test_sft_lowers_the_validation_loss_and_saves_a_plain_lora(
    chat_base: Path, tmp_path: Path
) -> None:
    splits = _splits(fixed_answer_records(60))
    reports: list[StepReport] = []
    recipe = LoRARecipe(FAST, chat_base, on_step=reports.append)
    recipe.setup(splits["train"], splits["validation"])
    before = recipe.evaluate()
    result = recipe.train()
    assert result.best_validation_loss is not None
    assert result.best_validation_loss < before - 0.3
    evaluated = [r for r in reports if r.validation_loss is not None]
    assert [r.step for r in evaluated] == [
        s for s in range(1, result.steps + 1) if s % FAST.eval_every == 0 or s == result.steps
    ]
    out = recipe.save(tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    assert not config.get("modules_to_save") and not config.get("use_dora")
    assert config["r"] == FAST.r
    names = load_file(out / "adapter_model.safetensors")
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)


class ScriptedValidationRecipe(LoRARecipe):
    """Fake validation losses (a narrow unit test of early stopping and best-keeping)."""

    losses = [3.0, 2.0, 2.5, 2.6, 2.7, 2.8]

    def evaluate(self) -> float:
        self.snapshots = getattr(self, "snapshots", [])
        self.snapshots.append(self._snapshot())
        return self.losses[len(self.snapshots) - 1]


def test_patience_stops_early_and_the_best_weights_are_saved(
    chat_base: Path, tmp_path: Path
) -> None:
    splits = _splits(fixed_answer_records(60))
    config = replace(FAST, eval_every=1, patience=2, epochs=10)
    recipe = ScriptedValidationRecipe(config, chat_base)
    recipe.setup(splits["train"], splits["validation"])
    result = recipe.train()
    assert result.stopped_early
    assert (result.steps, result.best_step, result.best_validation_loss) == (4, 2, 2.0)
    saved = load_file(recipe.save(tmp_path / "adapter") / "adapter_model.safetensors")
    best = recipe.snapshots[1]
    assert saved.keys() == best.keys()
    assert all(saved[name].equal(best[name]) for name in saved)
    assert not all(saved[n].equal(recipe.snapshots[-1][n]) for n in saved)


def test_should_stop_cancels_training(chat_base: Path) -> None:
    splits = _splits(fixed_answer_records(30))
    steps: list[int] = []
    recipe = LoRARecipe(
        FAST, chat_base, on_step=lambda r: steps.append(r.step), should_stop=lambda: len(steps) >= 2
    )
    recipe.setup(splits["train"], splits["validation"])
    with pytest.raises(TrainingCancelled, match="at step 2"):
        recipe.train()


def test_dpo_prefers_the_chosen_answers(chat_base: Path) -> None:
    splits = _splits(preference_records(60))
    config = replace(FAST, method="dpo", learning_rate=5e-3, epochs=3)
    recipe = LoRARecipe(config, chat_base)
    recipe.setup(splits["train"], splits["validation"])
    assert recipe.evaluate() == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    result = recipe.train()
    assert result.best_validation_loss is not None and result.best_validation_loss < 0.6


def test_bad_configs_list_every_problem(chat_base: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        TrainConfig(r=0, epochs=0, schedule="weird", dropout=1.5).validate()  # type: ignore[arg-type]
    message = str(refused.value)
    for fragment in ("r must be at least 1", "epochs must be at least 1", "schedule must be one"):
        assert fragment in message
    assert "dropout must be in [0, 1)" in message
    with pytest.raises(ConfigError, match="unknown hyperparameter 'rank'"):
        FAST.with_overrides({"rank": 4})
    recipe = LoRARecipe(replace(FAST, target_modules=("qkv_proj",)), chat_base)
    splits = _splits(fixed_answer_records(10))
    with pytest.raises(ConfigError, match="target module 'qkv_proj' is not in the base model"):
        recipe.setup(splits["train"], splits["validation"])
