"""One training run end to end, without a database: data -> audit -> train -> test eval.

Both the job worker and ``loraplex train`` call ``run_training``; the worker adds
claiming, heartbeats and registration around it.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from transformers import AutoTokenizer

from training.audit import AuditReport, audit, refuse_untrainable
from training.config import TrainConfig
from training.data import (
    Example,
    SplitFractions,
    check_method,
    dataset_sha256,
    load_jsonl,
    split_examples,
)
from training.evaluate import EvalMetrics, compare_on_test
from training.recipe import LoRARecipe, StepReport, TrainResult
from training.schema import check_schema


@dataclass(frozen=True)
class RunSpec:
    """Everything a training run needs."""

    base_dir: Path
    """Local Hugging Face directory of the base model."""
    training: bytes
    """The training JSONL file's bytes."""
    config: TrainConfig
    validation: bytes | None = None
    """A separate validation file; without one, validation is split off the training file."""
    schema: dict[str, Any] | None = None
    """JSON schema the answers must follow (scored as format compliance)."""
    production_dir: Path | None = None
    """The adapter's current production version, to compare against."""


@dataclass(frozen=True)
class Prepared:
    """Validated, split and audited data."""

    splits: dict[str, list[Example]]
    audit: AuditReport
    dataset_sha256: str
    test_sha256: str
    """SHA-256 over the test split's example keys (what the eval results were measured on)."""


@dataclass
class RunOutcome:
    adapter_dir: Path
    prepared: Prepared
    train: TrainResult
    metrics: dict[str, EvalMetrics] = field(default_factory=dict)
    """``candidate``, ``base`` and maybe ``production`` scores on the test split."""


def library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def _split_key(examples: Sequence[Example]) -> str:
    return hashlib.sha256("\n".join(sorted(e.key for e in examples)).encode()).hexdigest()


def prepare(spec: RunSpec) -> Prepared:
    """Parse, check against the method, split and audit; raises ``DatasetError``."""
    method = spec.config.method
    if spec.schema is not None:
        check_schema(spec.schema)
    examples = load_jsonl(spec.training, "the training file")
    check_method(examples, method, "the training file")
    held_out = spec.config.validation_fraction if spec.validation is None else 0.0
    fractions = SplitFractions(validation=held_out, test=spec.config.test_fraction)
    splits = split_examples(examples, fractions)
    if spec.validation is not None:
        validation = load_jsonl(spec.validation, "the validation file")
        check_method(validation, method, "the validation file")
        splits["validation"] = validation
    tokenizer = AutoTokenizer.from_pretrained(spec.base_dir)
    report = audit(examples, splits, tokenizer, spec.config.max_length)
    refuse_untrainable(report, method, "the training file")
    usable = set(report.usable)
    splits["train"] = [e for e in splits["train"] if e.line in usable]
    return Prepared(splits, report, dataset_sha256(spec.training), _split_key(splits["test"]))


def run_training(
    spec: RunSpec,
    out_dir: Path,
    on_step: Callable[[StepReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_prepared: Callable[[Prepared], None] | None = None,
) -> RunOutcome:
    """Train the adapter into ``out_dir`` and score it on the test split."""
    prepared = prepare(spec)
    if on_prepared is not None:
        on_prepared(prepared)
    recipe = LoRARecipe(spec.config, spec.base_dir, on_step, should_stop)
    recipe.setup(prepared.splits["train"], prepared.splits["validation"])
    result = recipe.train()
    adapter_dir = recipe.save(out_dir)
    del recipe  # frees the training copy of the base before evaluation loads one
    outcome = RunOutcome(adapter_dir, prepared, result)
    if prepared.splits["test"]:
        outcome.metrics = compare_on_test(
            spec.base_dir,
            prepared.splits["test"],
            adapter_dir,
            spec.production_dir,
            spec.schema,
            spec.config.max_length,
        )
    return outcome
