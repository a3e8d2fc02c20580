"""The data checks run before any training: what is in the file and what will be trained.

It counts examples per split, exact and near duplicates, blank answers, examples cut by
the maximum length, and examples left with no supervised token once prompts are masked.
Examples that cannot teach anything (blank, or nothing supervised) are dropped from
training; a dataset where that leaves nothing is refused rather than trained to a loss
of zero.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from training.data import DatasetError, Example, Method
from training.render import preference_turns, tokenize_example, tokenize_turn


@dataclass
class DataReport:
    """Counts describing a dataset; ``usable`` are the line numbers training may use."""

    examples: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    exact_duplicates: list[int] = field(default_factory=list)
    """Lines repeating an earlier line's content exactly."""
    near_duplicates: list[int] = field(default_factory=list)
    """Lines equal to an earlier one up to case, whitespace and punctuation (not exact)."""
    empty: list[int] = field(default_factory=list)
    """Lines whose answer is blank."""
    over_long: list[int] = field(default_factory=list)
    """Lines longer than the maximum length (cut; their tail is not trained)."""
    zero_supervised: list[int] = field(default_factory=list)
    """Lines with no supervised token left after masking and cutting."""
    supervised_tokens: int = 0
    """Answer tokens that carry a loss, over usable examples."""
    usable: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for job events and progress output."""
        return (
            f"{self.examples} examples ({', '.join(f'{k} {v}' for k, v in self.splits.items())}); "
            f"{len(self.usable)} usable, {self.supervised_tokens} supervised tokens; "
            f"{len(self.exact_duplicates)} exact and {len(self.near_duplicates)} near "
            f"duplicates, {len(self.empty)} empty, {len(self.over_long)} over-long, "
            f"{len(self.zero_supervised)} with nothing supervised"
        )


def _supervised_count(
    tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int
) -> tuple[int, bool]:
    """Supervised tokens of an example (the fewer of a preference pair) and whether cut."""
    if example.format == "preference":
        pair = [
            tokenize_turn(tokenizer, t, max_length) for t in preference_turns(tokenizer, example)
        ]
        return min(t.supervised_tokens for t in pair), any(t.truncated for t in pair)
    tokens = tokenize_example(tokenizer, example, max_length)
    return tokens.supervised_tokens, tokens.truncated


def _duplicates(examples: Sequence[Example]) -> tuple[list[int], list[int]]:
    exact_seen: set[str] = set()
    near_seen: set[str] = set()
    exact, near = [], []
    for example in examples:
        if example.key in exact_seen:
            exact.append(example.line)
        elif example.near_key in near_seen:
            near.append(example.line)
        exact_seen.add(example.key)
        near_seen.add(example.near_key)
    return exact, near


def check_data(
    examples: Sequence[Example],
    splits: Mapping[str, list[Example]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> DataReport:
    """Count everything the report shows; tokenizes every example once."""
    report = DataReport(examples=len(examples))
    report.formats = dict(Counter(e.format for e in examples))
    report.splits = {name: len(items) for name, items in splits.items()}
    report.exact_duplicates, report.near_duplicates = _duplicates(examples)
    for example in examples:
        count, cut = _supervised_count(tokenizer, example, max_length)
        if cut:
            report.over_long.append(example.line)
        if example.is_empty:
            report.empty.append(example.line)
        elif count == 0:
            report.zero_supervised.append(example.line)
        else:
            report.usable.append(example.line)
            report.supervised_tokens += count
    return report


def refuse_untrainable(report: DataReport, method: Method, source: str = "the file") -> None:
    """Raise ``DatasetError`` when no example is left to train on."""
    if report.usable:
        return
    problems = []
    if report.zero_supervised:
        problems.append(
            f"every label is masked: {len(report.zero_supervised)} example(s) have no "
            f"supervised token after masking prompts and cutting to the maximum length "
            f"(lines {_lines(report.zero_supervised)}); shorten the prompts or raise "
            "max_length"
        )
    if report.empty:
        problems.append(
            f"{len(report.empty)} example(s) have a blank answer (lines {_lines(report.empty)})"
        )
    answer = "chosen and rejected answers" if method == "dpo" else "assistant answers"
    problems.append(f"nothing left to train a {method} job on: give examples with {answer}")
    raise DatasetError(source, problems)


def _lines(lines: list[int], shown: int = 10) -> str:
    head = ", ".join(str(n) for n in lines[:shown])
    return head + (f" and {len(lines) - shown} more" if len(lines) > shown else "")
