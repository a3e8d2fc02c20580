"""One training run end to end, without a database: data -> checks -> train -> test eval.

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

from training.auto import Auto, Picked, choose
from training.config import TrainConfig
from training.data import (
    Example,
    SplitFractions,
    check_method,
    dataset_sha256,
    load_jsonl,
    split_examples,
)
from training.data_checks import DataReport, check_data, refuse_untrainable
from training.evaluate import BASE, EvalMetrics, Evaluator, SuiteRun, compare_on_test
from training.promotion import exact_match_decides
from training.recipe import LoRARecipe, StepReport, TrainResult
from training.render import reference_answer
from training.schema import check_regex, check_schema


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
    answer_regex: str | None = None
    """Regular expression the answers must match in full (scored as ``regex_match``)."""
    suites: Sequence[SuiteRun] = ()
    """The base's capability suites to score the trained adapter on (``training.capability``)."""
    production_dir: Path | None = None
    """The adapter's current production version, to compare against."""
    auto: Auto | None = None
    """Hyperparameters to pick (``training.auto``) before training; None: ``config`` as is."""
    init_dir: Path | None = None
    """An adapter (PEFT files) whose weights training continues; None: a fresh LoRA. Its
    shape must be ``config``'s (``training.recipe.init_overrides``). A learning-rate
    search (``auto``) still tries fresh adapters: it picks the rate for the data."""


@dataclass(frozen=True)
class Prepared:
    """Validated, split and checked data."""

    splits: dict[str, list[Example]]
    report: DataReport
    dataset_sha256: str
    test_sha256: str
    """SHA-256 over the test split's example keys (what the eval results were measured on)."""


@dataclass
class RunOutcome:
    adapter_dir: Path
    prepared: Prepared
    train: TrainResult
    choice: Picked
    """The config trained with, and how its ``auto`` values were picked."""
    metrics: dict[str, EvalMetrics] = field(default_factory=dict)
    """``candidate``, ``base`` and maybe ``production`` scores on the test split."""
    suites: dict[str, dict[str, EvalMetrics]] = field(default_factory=dict)
    """Per capability suite: ``candidate``, and ``base`` where it was to be measured."""


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
    """Parse, check against the method, split and count; raises ``DatasetError``."""
    method = spec.config.method
    if spec.schema is not None:
        check_schema(spec.schema)
    if spec.answer_regex is not None:
        check_regex(spec.answer_regex)
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
    report = check_data(examples, splits, tokenizer, spec.config.max_length)
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
    on_chosen: Callable[[Picked], None] | None = None,
) -> RunOutcome:
    """Train the adapter into ``out_dir`` and score it on the test split."""
    prepared = prepare(spec)
    if on_prepared is not None:
        on_prepared(prepared)
    choice = Picked(spec.config, {})
    if spec.auto is not None:
        choice = choose(spec.config, spec.auto, spec.base_dir, prepared.splits, should_stop)
        if on_chosen is not None:
            on_chosen(choice)
    recipe = LoRARecipe(choice.config, spec.base_dir, on_step, should_stop, spec.init_dir)
    recipe.setup(prepared.splits["train"], prepared.splits["validation"])
    result = recipe.train()
    adapter_dir = recipe.save(out_dir)
    del recipe  # frees the training copy of the base before evaluation loads one
    outcome = RunOutcome(adapter_dir, prepared, result, choice)
    if prepared.splits["test"] or spec.suites:
        compared = compare_on_test(
            spec.base_dir,
            prepared.splits["test"],
            adapter_dir,
            spec.production_dir,
            spec.schema,
            choice.config.max_length,
            spec.answer_regex,
            spec.suites,
        )
        outcome.metrics, outcome.suites = compared.test, compared.suites
    return outcome


@dataclass(frozen=True)
class BaseScore:
    """The base alone on a job's test split (an evaluation-only job, ``evaluate_base``)."""

    prepared: Prepared
    metrics: EvalMetrics | None
    """None when the data leaves no test split."""
    decides: str
    """The metric that decides for this task (``training.promotion``): ``exact_match``
    where the reference answers come from a fixed set, else ``loss``."""


def evaluate_base(spec: RunSpec) -> BaseScore:
    """Prepare the data as a training run would (the same split for the same config and
    seed) and score the base alone on the test split; nothing is trained."""
    prepared = prepare(spec)
    test = prepared.splits["test"]
    answers = [reference_answer(e) for e in test]
    decides = "exact_match" if exact_match_decides(answers) else "loss"
    if not test:
        return BaseScore(prepared, None, decides)
    evaluator = Evaluator(
        spec.base_dir, test, spec.config.max_length, spec.schema, spec.answer_regex
    )
    return BaseScore(prepared, evaluator.score(BASE), decides)
