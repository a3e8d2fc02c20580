"""Fine-tuning data: JSONL parsing, validation and the content-keyed split.

Three record formats, one per line:

- chat: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}``
- completion: ``{"prompt": "...", "completion": "..."}``
- preference: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (strings, or message lists
  for the prompt and an assistant message for chosen / rejected)

Parsing collects every malformed line before raising, so one run of ``load_jsonl`` tells
the user everything to fix. The split is a pure function of each example's (normalized)
content, so adding examples never moves an old one to another split, and near duplicates
(same text up to case, whitespace and punctuation) always land in the same split: they
cannot leak from training into the test set.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Message = dict[str, str]
Format = Literal["chat", "completion", "preference"]
Split = Literal["train", "validation", "test"]
Method = Literal["supervised", "dpo"]

ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_PROBLEMS = 50
"""Beyond this many problems the error message says how many more there are."""


class DatasetError(ValueError):
    """The data cannot be used; ``problems`` lists every reason (with line numbers)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:MAX_REPORTED_PROBLEMS]
        lines = "\n".join(f"  - {problem}" for problem in shown)
        more = len(problems) - len(shown)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{source} was refused ({len(problems)} problem(s)); fix these and upload it "
            f"again:\n{lines}{tail}"
        )


@dataclass(frozen=True)
class Example:
    """One validated record. ``data`` keeps only the fields of its format."""

    line: int
    """1-based line number in the source file."""
    format: Format
    data: Mapping[str, Any]

    @property
    def key(self) -> str:
        """SHA-256 of the canonical JSON of the content: equal for exact duplicates."""
        return _sha256(json.dumps(self.data, sort_keys=True, ensure_ascii=False))

    @property
    def near_key(self) -> str:
        """SHA-256 of the normalized text: equal for near duplicates (and the split key)."""
        return _sha256(normalize_text(_all_text(self.data)))

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to learn from: the answer text is blank."""
        if self.format == "chat":
            return not any(
                m["content"].strip() for m in self.data["messages"] if m["role"] == "assistant"
            )
        if self.format == "completion":
            return not self.data["completion"].strip()
        return not (_text(self.data["chosen"]).strip() and _text(self.data["rejected"]).strip())


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return str(value.get("content", ""))
    return "\n".join(_text(item) for item in value)


def _all_text(data: Mapping[str, Any]) -> str:
    return "\n".join(_text(data[name]) for name in sorted(data))


def normalize_text(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: the near-duplicate form."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# -- parsing ----------------------------------------------------------------------


def load_jsonl(content: bytes | str, source: str = "the file") -> list[Example]:
    """Every example of a JSONL file; raises ``DatasetError`` listing all malformed lines."""
    if isinstance(content, bytes):
        try:
            content = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(
                source, [f"not UTF-8 text (byte {exc.start}); save it as UTF-8"]
            ) from None
    examples: list[Example] = []
    problems: list[str] = []
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        example, line_problems = _parse_line(number, raw)
        problems.extend(f"line {number}: {p}" for p in line_problems)
        if example is not None:
            examples.append(example)
    if not examples and not problems:
        problems.append("no examples: the file is empty; put one JSON object per line")
    if problems:
        raise DatasetError(source, problems)
    return examples


def _parse_line(number: int, raw: str) -> tuple[Example | None, list[str]]:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, [f"invalid JSON ({exc.msg} at column {exc.colno})"]
    if not isinstance(record, dict):
        return None, [f"expected a JSON object, got {type(record).__name__}"]
    fmt = _detect_format(record)
    if fmt is None:
        return None, [
            "unknown record format (keys: "
            f"{', '.join(sorted(record)) or 'none'}); use 'messages', 'prompt'+'completion' "
            "or 'prompt'+'chosen'+'rejected'"
        ]
    fields = _FORMAT_FIELDS[fmt]
    problems = [p for name in fields for p in _FIELD_CHECKS[(fmt, name)](record.get(name), name)]
    if problems:
        return None, problems
    return Example(number, fmt, {name: record[name] for name in fields}), []


def _detect_format(record: Mapping[str, Any]) -> Format | None:
    if "messages" in record:
        return "chat"
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "prompt" in record or "completion" in record:
        return "completion"
    return None


def _check_string(value: Any, name: str) -> list[str]:
    if not isinstance(value, str):
        return [f"'{name}' must be a string, got {_kind(value)}"]
    return []


def _kind(value: Any) -> str:
    return "nothing (missing)" if value is None else type(value).__name__


def _check_message(value: Any, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where} must be an object with 'role' and 'content', got {_kind(value)}"]
    problems = []
    if value.get("role") not in ROLES:
        problems.append(f"{where} has role {value.get('role')!r}; use one of {', '.join(ROLES)}")
    if not isinstance(value.get("content"), str):
        problems.append(f"{where} 'content' must be a string, got {_kind(value.get('content'))}")
    return problems


def _check_messages(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not value:
        return [f"'{name}' must be a non-empty list of messages, got {_kind(value)}"]
    problems = [p for i, m in enumerate(value) for p in _check_message(m, f"{name}[{i}]")]
    if not problems and not any(m["role"] == "assistant" for m in value):
        problems.append(f"'{name}' has no assistant message: nothing to learn from")
    return problems


def _check_prompt(value: Any, name: str) -> list[str]:
    if isinstance(value, list):
        problems = [p for i, m in enumerate(value) for p in _check_message(m, f"{name}[{i}]")]
        return problems or ([] if value else [f"'{name}' must not be an empty list"])
    return _check_string(value, name)


def _check_answer(value: Any, name: str) -> list[str]:
    if isinstance(value, dict):
        problems = _check_message(value, f"'{name}'")
        if not problems and value["role"] != "assistant":
            problems.append(f"'{name}' must be an assistant message, got role {value['role']!r}")
        return problems
    return _check_string(value, name)


_FORMAT_FIELDS: dict[Format, tuple[str, ...]] = {
    "chat": ("messages",),
    "completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
}
_FIELD_CHECKS = {
    ("chat", "messages"): _check_messages,
    ("completion", "prompt"): _check_string,
    ("completion", "completion"): _check_string,
    ("preference", "prompt"): _check_prompt,
    ("preference", "chosen"): _check_answer,
    ("preference", "rejected"): _check_answer,
}


def check_method(examples: Iterable[Example], method: Method, source: str = "the file") -> None:
    """Refuse data whose format does not fit the training method (all offending lines)."""
    wanted: tuple[Format, ...] = ("preference",) if method == "dpo" else ("chat", "completion")
    wrong = [e for e in examples if e.format not in wanted]
    if not wrong:
        return
    hint = (
        "DPO needs preference pairs ('prompt', 'chosen', 'rejected')"
        if method == "dpo"
        else "supervised fine-tuning needs 'messages' or 'prompt'+'completion' records; "
        "train preference pairs with method 'dpo'"
    )
    problems = [f"line {e.line}: a {e.format} record in a {method} job; {hint}" for e in wrong]
    raise DatasetError(source, problems)


# -- split ------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitFractions:
    """How much of the data each held-out split gets (the rest trains)."""

    validation: float = 0.1
    """Share for the validation split (early stopping, best checkpoint)."""
    test: float = 0.1
    """Share for the test split (the final evaluation, never trained or selected on)."""


def split_of(example: Example, fractions: SplitFractions) -> Split:
    """The split an example belongs to, from its normalized content alone."""
    position = int(example.near_key[:15], 16) / 16**15
    if position < fractions.test:
        return "test"
    if position < fractions.test + fractions.validation:
        return "validation"
    return "train"


def split_examples(
    examples: Iterable[Example], fractions: SplitFractions
) -> dict[str, list[Example]]:
    """Examples grouped by split (train, validation, test), file order kept within each."""
    splits: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    for example in examples:
        splits[split_of(example, fractions)].append(example)
    return splits


def dataset_sha256(content: bytes) -> str:
    """The provenance hash of a training file: SHA-256 of its bytes."""
    return hashlib.sha256(content).hexdigest()
