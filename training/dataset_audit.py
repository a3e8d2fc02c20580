"""The data audit of a dataset version: what a reviewer should know before training on it.

``audit(examples)`` is a pure function of the examples (fine-tuning file records, in
order): it counts them and their formats, finds near duplicates and blank answers,
measures lengths (in characters, and in tokens estimated as characters / 3, the
gateway's own estimate), and finds **leakage**: groups of examples asking the same thing
that fall in different splits, so training on one half teaches the answer the
validation or test split is scored on.

Splits are the training pipeline's own (``training.data.split_of`` with the default
``SplitFractions``). That split keys on the normalized text of the whole example, so exact
and near duplicates (equal up to case, whitespace and punctuation) always share a split;
what can still leak is the same prompt with a different answer (a reworded or corrected
answer, a second sample), which is what the prompt groups find. Near-duplicate groups are
checked for straddling too, so a change to the split rule cannot hide a leak.

It runs in the API process on every new version: no tokenizer, no torch. Positions in
the report are 0-based indices into the version's examples, in order.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from training.data import (
    DatasetError,
    Example,
    SplitFractions,
    load_jsonl,
    normalize_text,
    split_of,
)

CHARS_PER_TOKEN_ESTIMATE = 3
"""The gateway's token estimate (server.gateway.accounting; training may not import it)."""
SAMPLE = 20
"""Most groups (or positions) a report lists of each kind; counts cover them all."""
FRACTIONS = SplitFractions()
"""The pipeline's default split (TrainConfig's validation and test fractions, 0.1 each)."""


def audit(
    examples: Sequence[Mapping[str, Any]], fractions: SplitFractions = FRACTIONS
) -> dict[str, Any]:
    """The audit report of ``examples`` (JSON-serializable)."""
    parsed, problems = _parse(examples)
    split = {i: split_of(e, fractions) for i, e in parsed}
    lengths = [_chars(e) for _, e in parsed]
    near = _groups((i, e.near_key) for i, e in parsed)
    by_prompt = _groups((i, _prompt_key(e)) for i, e in parsed)
    leaks = _straddling(near + by_prompt, split)
    held_out = {i for group in leaks for i in group if split[i] != "train"}
    return {
        "examples": len(examples),
        "invalid": _positions(sorted(problems), [p for ps in problems.values() for p in ps]),
        "formats": dict(Counter(e.format for _, e in parsed)),
        "splits": dict(Counter(split.values())),
        "fractions": {"validation": fractions.validation, "test": fractions.test},
        "exact_duplicates": _report(_groups((i, e.key) for i, e in parsed)),
        "near_duplicates": _report(near),
        "blank_answers": _positions([i for i, e in parsed if e.is_empty]),
        "length": {
            "chars": _stats(lengths),
            "estimated_tokens": _stats([_tokens(n) for n in lengths]),
        },
        "leakage": {
            **_report(leaks),
            "held_out_examples": len(held_out),
            "sample": [{"positions": g, "splits": [split[i] for i in g]} for g in leaks[:SAMPLE]],
        },
    }


def _parse(
    examples: Sequence[Mapping[str, Any]],
) -> tuple[list[tuple[int, Example]], dict[int, list[str]]]:
    """(position, parsed example) for each example the fine-tuning file parser takes, and
    the problems of the others by position. Versions hold only records that parsed when
    added, so the fast path parses them as one file (line n is position n - 1)."""
    if not examples:
        return [], {}
    lines = "\n".join(json.dumps(e, ensure_ascii=False) for e in examples)
    try:
        return list(enumerate(load_jsonl(lines, "the version"))), {}
    except DatasetError:
        pass
    parsed: list[tuple[int, Example]] = []
    problems: dict[int, list[str]] = {}
    for position, example in enumerate(examples):
        try:
            parsed.append((position, load_jsonl(json.dumps(example), "the example")[0]))
        except DatasetError as exc:
            problems[position] = [f"position {position}: {p}" for p in exc.problems]
    return parsed, problems


def _texts(value: Any) -> Iterable[str]:
    """Every string of a field: itself, a message's content, or a message list's."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        content = value.get("content")
        yield content if isinstance(content, str) else ""
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)


def _prompt(example: Example) -> list[str]:
    """What the example asks: all but its answer (a chat's messages before the last
    assistant message; a completion's or preference pair's prompt)."""
    if example.format != "chat":
        return list(_texts(example.data["prompt"]))
    messages = list(example.data["messages"])
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return list(_texts(messages[:last]))


def _prompt_key(example: Example) -> str | None:
    text = normalize_text("\n".join(_prompt(example)))
    return hashlib.sha256(text.encode()).hexdigest() if text else None


def _chars(example: Example) -> int:
    return sum(len(t) for value in example.data.values() for t in _texts(value))


def _tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN_ESTIMATE)


def _groups(keys: Iterable[tuple[int, str | None]]) -> list[list[int]]:
    """Positions sharing a key, for each key held more than once (None: no key)."""
    found: dict[str, list[int]] = defaultdict(list)
    for position, key in keys:
        if key is not None:
            found[key].append(position)
    return [group for group in found.values() if len(group) > 1]


def _straddling(groups: list[list[int]], splits: Mapping[int, str]) -> list[list[int]]:
    """The groups spanning more than one split, each once, in order of first position."""
    seen: set[tuple[int, ...]] = set()
    leaks = []
    for group in sorted(groups):
        if len({splits[i] for i in group}) > 1 and tuple(group) not in seen:
            seen.add(tuple(group))
            leaks.append(group)
    return leaks


def _report(groups: list[list[int]]) -> dict[str, Any]:
    return {
        "groups": len(groups),
        "examples": sum(len(g) for g in groups),
        "sample": groups[:SAMPLE],
    }


def _positions(positions: list[int], problems: Sequence[str] = ()) -> dict[str, Any]:
    found: dict[str, Any] = {"count": len(positions), "sample": positions[:SAMPLE]}
    if problems:
        found["problems"] = list(problems[:SAMPLE])
    return found


def _stats(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"total": 0, "min": None, "max": None, "mean": None, "p50": None, "p95": None}
    ordered = sorted(values)
    return {
        "total": sum(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 1),
        "p50": _percentile(ordered, 0.50),
        "p95": _percentile(ordered, 0.95),
    }


def _percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of sorted values."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
