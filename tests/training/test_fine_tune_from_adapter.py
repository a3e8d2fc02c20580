"""Fine-tuning a fine-tuned model: training continues an adapter version's weights.

Real PEFT on the tiny chat base: continuing a trained adapter starts at a lower loss than a
fresh LoRA on the same data, takes the adapter's shape over the job's, and the version it
registers names the version it continued as its parent.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from registry import PRODUCTION
from registry.jobs import SUCCEEDED
from tests.training.conftest import Bench
from tests.training.training_testdata import FAST, fixed_answer_records, jsonl
from training.config import ConfigError
from training.data import Example, SplitFractions, load_jsonl, split_examples
from training.recipe import LoRARecipe, StepReport, init_overrides

SHAPE = replace(FAST, r=4, alpha=8.0, epochs=8, target_modules=("q_proj", "v_proj", "down_proj"))
"""A shape unlike FAST's, so taking the continued adapter's shape shows."""


def _splits(records: list[dict[str, Any]]) -> dict[str, list[Example]]:
    return split_examples(load_jsonl(jsonl(records)), SplitFractions(0.15, 0.1))


def _first_loss(recipe: LoRARecipe, splits: dict[str, list[Example]]) -> float:
    reports: list[StepReport] = []
    recipe.on_step = reports.append
    recipe.setup(splits["train"], splits["validation"])
    recipe.train()
    return reports[0].train_loss


def test_continuing_an_adapter_starts_lower_than_a_fresh_lora(
    chat_base: Path, tmp_path: Path
) -> None:
    splits = _splits(fixed_answer_records(40))
    trained = LoRARecipe(SHAPE, chat_base)
    trained.setup(splits["train"], splits["validation"])
    trained.train()
    adapter = trained.save(tmp_path / "trained")
    del trained
    shape = init_overrides(adapter)
    assert shape == {"r": 4, "alpha": 8.0, "target_modules": ("down_proj", "q_proj", "v_proj")}
    once = replace(FAST, epochs=1, max_steps=1)
    fresh = _first_loss(LoRARecipe(once.with_overrides(shape), chat_base), splits)
    continued_recipe = LoRARecipe(once.with_overrides(shape), chat_base, init_dir=adapter)
    continued = _first_loss(continued_recipe, splits)
    assert continued < fresh - 0.3, (continued, fresh)
    continued_recipe.save(tmp_path / "continued")
    assert init_overrides(tmp_path / "continued") == shape  # the same servable shape


def test_a_directory_without_an_adapter_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a PEFT adapter to continue from"):
        init_overrides(tmp_path)


def test_a_job_on_an_adapter_version_continues_it_and_names_it_as_parent(bench: Bench) -> None:
    registry, tenant_id = bench.registry, bench.tenant_id
    records = fixed_answer_records(24)
    shape = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    first = bench.submit(records, hyperparameters=shape)
    bench.worker().run_once()
    assert bench.job(first.id).status == SUCCEEDED
    v1 = registry.get_version(tenant_id, "bot", 1)
    second = bench.submit(records, init_version_id=v1.id, hyperparameters={"r": 16})
    bench.worker().run_once()
    done = bench.job(second.id)
    assert done.status == SUCCEEDED, done.error
    assert done.result is not None and done.result["config"]["r"] == 4
    v2 = registry.get_version(tenant_id, "bot", 2)
    assert v2.parent_version_id == v1.id and v2.rank == 4
    assert sorted(m.rsplit(".", 1)[-1] for m in set(v2.target_modules)) == sorted(
        {m.rsplit(".", 1)[-1] for m in v1.target_modules}
    )
    messages = [e.message for e in bench.store.events(tenant_id, second.id, limit=100)]
    started = [m for m in messages if m.startswith("Starting from bot version 1's weights")]
    assert started and "rank 4" in started[0] and "the job's r did not apply" in started[0]
    assert registry.aliases(tenant_id, "bot")[PRODUCTION].version in (1, 2)
