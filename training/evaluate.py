"""Evaluation on the held-out test split: loss, exact match, JSON-schema compliance, regex
match; and on the base's capability suites (``registry.capability``): loss, exact match.

The new adapter, the bare base model and (when there is one) the adapter's current
production version are scored on the same examples with the same greedy decoding, so
the stored numbers compare like with like. All three share one loaded base: the base is
the PEFT model with its adapters disabled, the others are named adapters on it. A
capability suite is scored by the same loaded models (``Evaluator.on``), the candidate
always and the base when its reference is still to be measured, with a fixed token budget
(``CAPABILITY_MAX_LENGTH``) whatever the job's, so a reference and every later
candidate's score are measured alike.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from training.data import Example
from training.losses import collate, mean_answer_loss
from training.recipe import load_base
from training.render import Turn, final_turn, tokenize_text, tokenize_turn
from training.schema import check_regex, is_compliant, matches_regex

CANDIDATE = "candidate"
BASE = "base"
INCUMBENT = "production"
"""The label of the adapter's current production version among the scored models."""
MAX_NEW_TOKENS = 256
"""Upper bound on generated tokens per test prompt (answers longer than this can't match)."""
GENERATION_BATCH = 16
CAPABILITY_MAX_LENGTH = 1024
"""Tokens per capability example (for its loss): fixed, so every job measures it alike."""


@dataclass(frozen=True)
class EvalMetrics:
    """Scores of one model on the test split."""

    loss: float
    """Mean cross-entropy of the reference answers' tokens."""
    exact_match: float
    """Share of prompts whose greedy answer equals the reference (whitespace-trimmed)."""
    format_compliance: float | None
    """Share of greedy answers that are JSON valid under the job's schema (None: no schema)."""
    samples: int
    regex_match: float | None = None
    """Share of greedy answers (whitespace-trimmed) that match the job's ``answer_regex`` in
    full (None: no regex)."""

    def as_metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if k != "samples" and v is not None}


class Evaluator:
    """Scores models that share one base on a fixed set of test examples."""

    def __init__(
        self,
        base_dir: Path,
        examples: Sequence[Example],
        max_length: int = 1024,
        schema: dict[str, Any] | None = None,
        regex: str | None = None,
    ) -> None:
        self.tokenizer, base, self.device = load_base(Path(base_dir))
        self.base = base
        self.model: PeftModel | None = None
        self.turns = [final_turn(self.tokenizer, e) for e in examples]
        self.max_length = max_length
        self.schema = schema
        self.regex = None if regex is None else check_regex(regex)

    def on(self, examples: Sequence[Example], max_length: int) -> Evaluator:
        """These loaded models on other examples, scored by loss and exact match only."""
        view = copy.copy(self)
        view.turns = [final_turn(self.tokenizer, e) for e in examples]
        view.max_length, view.schema, view.regex = max_length, None, None
        return view

    def add_adapter(self, name: str, adapter_dir: Path) -> None:
        """Load an adapter (candidate or production) onto the shared base."""
        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, adapter_dir, adapter_name=name)
        else:
            self.model.load_adapter(adapter_dir, adapter_name=name)
        self.model.eval()

    @contextlib.contextmanager
    def _using(self, name: str) -> Iterator[torch.nn.Module]:
        if self.model is None:
            yield self.base
        elif name == BASE:
            with self.model.disable_adapter():
                yield self.model
        else:
            self.model.set_adapter(name)
            yield self.model

    @torch.no_grad()
    def answers(self, name: str) -> list[str]:
        """The greedy answers of ``name`` to the test prompts, in order, as ``score`` judges
        them (special tokens dropped, not yet trimmed)."""
        with self._using(name) as model:
            return self._generate(model)

    @torch.no_grad()
    def score(self, name: str) -> EvalMetrics:
        """Metrics of ``name`` (``base`` or a loaded adapter's name)."""
        with self._using(name) as model:
            loss = self._loss(model)
        answers = self.answers(name)
        exact = [a.strip() == t.answer for a, t in zip(answers, self.turns, strict=True)]
        compliance = None
        if self.schema is not None:
            compliant = [is_compliant(a, self.schema) for a in answers]
            compliance = sum(compliant) / max(1, len(compliant))
        matched = None
        if self.regex is not None:
            regex = self.regex
            matched = sum(matches_regex(a, regex) for a in answers) / max(1, len(answers))
        return EvalMetrics(
            loss, sum(exact) / max(1, len(exact)), compliance, len(self.turns), matched
        )

    def _loss(self, model: torch.nn.Module) -> float:
        items = [tokenize_turn(self.tokenizer, t, self.max_length) for t in self.turns]
        items = [item for item in items if item.supervised_tokens]
        total, count = 0.0, 0
        for start in range(0, len(items), GENERATION_BATCH):
            chunk = items[start : start + GENERATION_BATCH]
            batch = collate(chunk, self._pad_id, self.device)
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += float(mean_answer_loss(model, batch)) * tokens
            count += tokens
        return total / max(1, count)

    @property
    def _pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id or self.tokenizer.eos_token_id or 0)

    def _generate(self, model: torch.nn.Module) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(self.turns), GENERATION_BATCH):
            answers.extend(
                self._generate_batch(model, self.turns[start : start + GENERATION_BATCH])
            )
        return answers

    def _generate_batch(self, model: torch.nn.Module, turns: Sequence[Turn]) -> list[str]:
        prompts = [tokenize_text(self.tokenizer, t.prompt_text, first=True) for t in turns]
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends where generation starts.
        ids = torch.tensor([[self._pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        output = model.generate(  # type: ignore[operator]
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=new_token_budget(self.tokenizer, turns),
            do_sample=False,
            pad_token_id=self._pad_id,
        )
        return decode_answers(self.tokenizer, output[:, width:])


def new_token_budget(tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn]) -> int:
    """Generated tokens allowed for one batch of prompts: its longest reference answer plus
    a little slack (a longer answer cannot match), at most ``MAX_NEW_TOKENS``."""
    budget = max(len(tokenize_text(tokenizer, t.answer_text, False)) for t in turns)
    return min(MAX_NEW_TOKENS, budget + 8)


def decode_answers(tokenizer: PreTrainedTokenizerBase, generated: torch.Tensor) -> list[str]:
    """Generated ids to text, special tokens (end of turn, padding) dropped."""
    return [str(tokenizer.decode(row, skip_special_tokens=True)) for row in generated.tolist()]


@dataclass(frozen=True)
class SuiteRun:
    """A capability suite of the base to score beside the test split."""

    name: str
    examples: Sequence[Example]
    with_base: bool
    """Score the base too: its reference on the suite is still to be measured."""


@dataclass
class Comparison:
    """What ``compare_on_test`` measured."""

    test: dict[str, EvalMetrics]
    """``candidate``, ``base`` and maybe ``production`` on the test split (empty: none)."""
    suites: dict[str, dict[str, EvalMetrics]]
    """Per capability suite: ``candidate``, and ``base`` where it was to be measured."""


def compare_on_test(
    base_dir: Path,
    examples: Sequence[Example],
    candidate_dir: Path,
    production_dir: Path | None = None,
    schema: dict[str, Any] | None = None,
    max_length: int = 1024,
    regex: str | None = None,
    suites: Sequence[SuiteRun] = (),
) -> Comparison:
    """Metrics of the candidate, the base and (if given) the production version on the
    test split, and of the candidate (and the base, where asked) on each capability suite."""
    evaluator = Evaluator(base_dir, examples, max_length, schema, regex)
    evaluator.add_adapter(CANDIDATE, candidate_dir)
    names = [CANDIDATE, BASE]
    if production_dir is not None:
        evaluator.add_adapter(INCUMBENT, production_dir)
        names.append(INCUMBENT)
    test = {name: evaluator.score(name) for name in names} if examples else {}
    scored = {}
    for suite in suites:
        view = evaluator.on(suite.examples, CAPABILITY_MAX_LENGTH)
        models = [CANDIDATE, BASE] if suite.with_base else [CANDIDATE]
        scored[suite.name] = {name: view.score(name) for name in models}
    return Comparison(test, scored)
