"""Content-based routing: which target a routed model's request goes to.

A *routed model* is one model name in front of several of a tenant's adapters (or a
base). Its policy decides per request, in order:

1. **rules**, first match wins: a regular expression or a keyword set on one field of the
   request (the last user message, the system prompt, the ``user`` field, or a
   ``metadata`` value);
2. **a classifier**, when no rule matched and the policy has one: a small adapter of the
   tenant's that answers a label for the last user message; the gateway makes that engine
   call and hands its answer here (``RoutingPolicy.by_label``), which maps the label to a target,
   or falls back to the default when the answer is not one of the labels (or, with
   ``min_confidence``, when the answer's probability is below it);
3. **the default** target.

Targets are model names the tenant could send itself: one of its adapters (its
production/canary split applies) or a base's served name; never another routed model.
The registry checks that they are the tenant's own when a policy is saved.

Tenants write the patterns, so they run on RE2 (``google-re2``), whose matching takes time
linear in the text whatever the pattern: no pattern can backtrack catastrophically. RE2
has no lookarounds or backreferences; a pattern using them is refused when the policy is
saved. A rule reads at most the last ``MAX_SCANNED_CHARS`` of its field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import re2

from router.names import InvalidModelName, check_characters

LAST_USER = "last_user"
SYSTEM = "system"
USER = "user"
METADATA_PREFIX = "metadata."
FIELDS = (LAST_USER, SYSTEM, USER)
"""The request fields a rule can read, besides ``metadata.<key>``."""

MAX_RULES = 64
MAX_PATTERN_CHARS = 512
MAX_KEYWORDS = 256
MAX_KEYWORD_CHARS = 64
MAX_LABELS = 64
MAX_LABEL_CHARS = 64
MAX_INSTRUCTION_CHARS = 4096
MAX_CLASSIFIER_TOKENS = 32
MAX_SCANNED_CHARS = 8192
"""Characters of a field a rule reads: the last ones (a long conversation's end)."""
DEFAULT_CLASSIFIER_TOKENS = 8
DEFAULT_CACHE_SECONDS = 300.0


class InvalidRoutingPolicy(ValueError):
    """A routing policy that cannot be used; ``problems`` lists every reason at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid routing policy: " + "; ".join(problems))


class RoutingReason(StrEnum):
    """Why a decision chose its target."""

    RULE = "rule"
    CLASSIFIER = "classifier"
    DEFAULT = "default"
    FALLBACK = "fallback"
    """The classifier answered no label (or too unsure a one): the default was used."""


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """Where one request goes, and why."""

    target: str
    """The model name the request is served as: an adapter's or a base's."""
    reason: RoutingReason
    rule: int | None = None
    """The matching rule's position, 1 upwards (``RULE`` only)."""
    label: str | None = None
    """The classifier's label (``CLASSIFIER``), or its unusable answer (``FALLBACK``)."""


@dataclass(frozen=True, slots=True)
class RequestText:
    """What rules and the classifier read from a request."""

    last_user: str = ""
    """The last user message's text (a completion's prompt)."""
    system: str = ""
    """Every system (and developer) message's text, joined by newlines."""
    user: str = ""
    """The request's ``user`` field."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """The request's ``metadata`` (string values only)."""

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> RequestText:
        """The text of a chat completion or completion request body (never raises)."""
        user = body.get("user")
        metadata = body.get("metadata")
        meta = (
            {k: v for k, v in metadata.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(metadata, dict)
            else {}
        )
        last_user, system = _chat_text(body.get("messages"))
        if "messages" not in body:
            last_user = _prompt_text(body.get("prompt"))
        return cls(last_user, system, user if isinstance(user, str) else "", meta)

    def field(self, name: str) -> str:
        if name.startswith(METADATA_PREFIX):
            return self.metadata.get(name[len(METADATA_PREFIX) :], "")
        return str(getattr(self, name))


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only the text ones are read
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


def _chat_text(messages: Any) -> tuple[str, str]:
    if not isinstance(messages, list):
        return "", ""
    last_user, system = "", []
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role == "user":
            last_user = _content_text(message.get("content"))
        elif role in ("system", "developer"):
            system.append(_content_text(message.get("content")))
    return last_user, "\n".join(system)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], str):
        return str(prompt[-1])
    return ""


@dataclass(frozen=True, slots=True)
class RoutingRule:
    """One rule: a pattern or a keyword set on one field, and the target it sends to."""

    target: str
    """Where a matching request goes."""
    field: str = LAST_USER
    """``last_user``, ``system``, ``user`` or ``metadata.<key>``."""
    pattern: str | None = None
    """A regular expression searched for anywhere in the field (``(?i)`` for any case)."""
    keywords: tuple[str, ...] = ()
    """Words or phrases any one of which matches as a whole word, in any case."""


@dataclass(frozen=True, slots=True)
class Classifier:
    """A tenant's adapter that answers a label for the last user message."""

    adapter: str
    """The classifier adapter's name (its production/canary split applies)."""
    labels: Mapping[str, str]
    """Label -> target. An answer that is none of them falls back to the default."""
    instruction: str | None = None
    """A system message sent before the user's message, as the classifier was trained."""
    max_tokens: int = DEFAULT_CLASSIFIER_TOKENS
    """Tokens the classifier may answer with: a label needs few."""
    min_confidence: float | None = None
    """The answer's probability (its tokens' log-probabilities summed) below which the
    default is used instead. None: any answer that is a label counts."""
    cache_seconds: float = DEFAULT_CACHE_SECONDS
    """How long the label for an identical prompt is reused without a new engine call
    (0: never)."""


@dataclass(frozen=True)
class RoutingPolicy:
    """A routed model's policy: rules, then the classifier, then the default."""

    default: str
    """The target when no rule matched and there is no classifier (or it fell back)."""
    rules: tuple[RoutingRule, ...] = ()
    classifier: Classifier | None = None
    _compiled: list[Any] = field(init=False, repr=False, compare=False)
    """Each rule's matcher, compiled once per policy (the gateway caches policies)."""
    _labels: dict[str, str] = field(init=False, repr=False, compare=False)
    """Case-folded label -> label."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", [_compile(rule) for rule in self.rules])
        labels = {} if self.classifier is None else self.classifier.labels
        object.__setattr__(self, "_labels", {k.casefold(): k for k in labels})

    @classmethod
    def from_json(cls, data: Any) -> RoutingPolicy:
        """The policy a JSON document describes; ``InvalidRoutingPolicy`` naming every problem."""
        return _Parser().policy(data)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "default": self.default,
            "rules": [_rule_json(r) for r in self.rules],
        }
        if self.classifier is not None:
            c = self.classifier
            out["classifier"] = {
                "adapter": c.adapter,
                "labels": dict(c.labels),
                "instruction": c.instruction,
                "max_tokens": c.max_tokens,
                "min_confidence": c.min_confidence,
                "cache_seconds": c.cache_seconds,
            }
        return out

    def targets(self) -> list[str]:
        """Every model name a decision may send to, in first-mentioned order."""
        names = [r.target for r in self.rules]
        if self.classifier is not None:
            names += list(self.classifier.labels.values())
        return list(dict.fromkeys([*names, self.default]))

    def references(self) -> list[str]:
        """Every model name the policy uses: its targets and its classifier adapter."""
        extra = [self.classifier.adapter] if self.classifier is not None else []
        return list(dict.fromkeys([*self.targets(), *extra]))

    def by_rules(self, text: RequestText) -> RoutingDecision | None:
        """The first matching rule's decision; None when no rule matched (then the
        classifier decides, or ``default_decision``)."""
        fields: dict[str, str] = {}  # each field read once, however many rules read it
        for index, (rule, matcher) in enumerate(zip(self.rules, self._compiled, strict=True)):
            value = fields.get(rule.field)
            if value is None:
                value = fields[rule.field] = text.field(rule.field)[-MAX_SCANNED_CHARS:]
            if matcher.search(value) is not None:
                return RoutingDecision(rule.target, RoutingReason.RULE, rule=index + 1)
        return None

    def by_label(self, answer: str, confidence: float | None = None) -> RoutingDecision:
        """The decision for the classifier's ``answer`` (and its probability, when known)."""
        assert self.classifier is not None, "by_label needs a policy with a classifier"
        label = self._labels.get(label_text(answer).casefold())
        floor = self.classifier.min_confidence
        unsure = floor is not None and (confidence is None or confidence < floor)
        if label is None or unsure:
            unusable = answer.strip()[:MAX_LABEL_CHARS]
            return RoutingDecision(self.default, RoutingReason.FALLBACK, label=unusable)
        return RoutingDecision(self.classifier.labels[label], RoutingReason.CLASSIFIER, label=label)

    def default_decision(self) -> RoutingDecision:
        return RoutingDecision(self.default, RoutingReason.DEFAULT)

    def classifier_messages(self, text: RequestText) -> list[dict[str, str]]:
        """The chat messages the classifier is asked: its instruction, the last user message."""
        assert self.classifier is not None, "classifier_messages needs a classifier"
        messages = []
        if self.classifier.instruction:
            messages.append({"role": "system", "content": self.classifier.instruction})
        messages.append({"role": "user", "content": text.last_user})
        return messages


def label_text(answer: str) -> str:
    """The label an answer names: its text stripped of whitespace, quotes and a final
    period, or the one string value of a JSON object answer (``{"intent": "billing"}``)."""
    text = answer.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, dict):
            strings = [v for v in value.values() if isinstance(v, str)]
            text = strings[0].strip() if len(strings) == 1 else text
    # A final period inside or outside the quotes: `billing`. and "billing." alike.
    return text.removesuffix(".").strip("\"'` ").removesuffix(".").strip()


def answer_probability(logprobs: Iterable[float]) -> float:
    """The probability of a whole answer from its tokens' log-probabilities."""
    return math.exp(sum(logprobs))


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # a tenant's invalid pattern is their 400, not our log line
    return options


_RE2_OPTIONS = _options()


def _compile(rule: RoutingRule) -> Any:
    if rule.pattern is not None:
        return re2.compile(rule.pattern, _RE2_OPTIONS)
    words = sorted(rule.keywords, key=len, reverse=True)  # longest first: phrases win
    alternatives = "|".join(re2.escape(w) for w in words)
    # Whole words without lookarounds (RE2 has none): a non-word character or an end on
    # each side; consuming it is harmless, as only whether it matches counts.
    return re2.compile(rf"(?i)(?:^|\W)(?:{alternatives})(?:\W|$)", _RE2_OPTIONS)


def _re2_problem(pattern: str) -> str | None:
    """Why RE2 cannot compile ``pattern`` (in words), or None."""
    try:
        re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "invalid"
        return reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
    return None


def _rule_json(rule: RoutingRule) -> dict[str, Any]:
    out: dict[str, Any] = {"target": rule.target, "field": rule.field}
    if rule.pattern is not None:
        out["pattern"] = rule.pattern
    else:
        out["keywords"] = list(rule.keywords)
    return out


class _Parser:
    """Reads a policy document, collecting every problem rather than stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def policy(self, data: Any) -> RoutingPolicy:
        if not isinstance(data, dict):
            raise InvalidRoutingPolicy(["the policy must be a JSON object"])
        self._unknown(data, {"default", "rules", "classifier"}, "policy")
        default = self._target(data.get("default"), "default")
        raw_rules = data.get("rules", [])
        if not isinstance(raw_rules, list):
            self.problems.append("rules must be a list")
            raw_rules = []
        if len(raw_rules) > MAX_RULES:
            self.problems.append(f"at most {MAX_RULES} rules (got {len(raw_rules)})")
        rules = [self._rule(r, f"rules[{i}]") for i, r in enumerate(raw_rules[:MAX_RULES])]
        classifier = None
        if data.get("classifier") is not None:
            classifier = self._classifier(data["classifier"])
        if self.problems:
            raise InvalidRoutingPolicy(self.problems)
        return RoutingPolicy(default, tuple(r for r in rules if r is not None), classifier)

    def _unknown(self, data: dict[str, Any], known: set[str], where: str) -> None:
        for key in sorted(set(data) - known):
            self.problems.append(
                f"{where}: unknown field {key!r} (known: {', '.join(sorted(known))})"
            )

    def _target(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            self.problems.append(f"{where} must name an adapter or a base model")
            return ""
        try:
            check_characters(value)
        except InvalidModelName as exc:
            self.problems.append(f"{where}: {exc}")
        return value

    def _rule(self, data: Any, where: str) -> RoutingRule | None:
        if not isinstance(data, dict):
            self.problems.append(
                f"{where} must be an object with target, field and pattern or keywords"
            )
            return None
        self._unknown(data, {"target", "field", "pattern", "keywords"}, where)
        target = self._target(data.get("target"), f"{where}.target")
        field_name = data.get("field", LAST_USER)
        if not _known_field(field_name):
            self.problems.append(
                f"{where}.field must be one of {', '.join(FIELDS)} or metadata.<key> "
                f"(got {field_name!r})"
            )
        has_pattern, has_keywords = "pattern" in data, "keywords" in data
        if has_pattern == has_keywords:
            self.problems.append(f"{where} needs exactly one of pattern and keywords")
            return None
        if has_pattern:
            pattern = self._pattern(data["pattern"], f"{where}.pattern")
            return RoutingRule(target, str(field_name), pattern=pattern)
        keywords = self._keywords(data["keywords"], where)
        return RoutingRule(target, str(field_name), keywords=keywords)

    def _pattern(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            self.problems.append(f"{where} must be a non-empty string")
            return "$^"
        if len(value) > MAX_PATTERN_CHARS:
            self.problems.append(f"{where} is {len(value)} characters; at most {MAX_PATTERN_CHARS}")
            return "$^"
        problem = _re2_problem(value)
        if problem is not None:
            self.problems.append(
                f"{where} is not a valid regular expression for RE2 ({problem}); RE2 has "
                "no lookarounds or backreferences"
            )
            return "$^"
        return value

    def _keywords(self, value: Any, where: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not value or len(value) > MAX_KEYWORDS:
            self.problems.append(f"{where}.keywords must be a list of 1 to {MAX_KEYWORDS} strings")
            return ("\x00",)
        bad = [
            w
            for w in value
            if not isinstance(w, str) or not w.strip() or len(w) > MAX_KEYWORD_CHARS
        ]
        if bad:
            self.problems.append(
                f"{where}.keywords: each must be a non-blank string of at most "
                f"{MAX_KEYWORD_CHARS} characters (bad: {bad[:3]!r})"
            )
            return ("\x00",)
        return tuple(w.strip() for w in value)

    def _classifier(self, data: Any) -> Classifier | None:
        where = "classifier"
        if not isinstance(data, dict):
            self.problems.append(f"{where} must be an object with adapter and labels")
            return None
        known = {
            "adapter",
            "labels",
            "instruction",
            "max_tokens",
            "min_confidence",
            "cache_seconds",
        }
        self._unknown(data, known, where)
        adapter = self._target(data.get("adapter"), f"{where}.adapter")
        labels = self._labels(data.get("labels"))
        instruction = data.get("instruction")
        if instruction is not None and (
            not isinstance(instruction, str) or len(instruction) > MAX_INSTRUCTION_CHARS
        ):
            self.problems.append(
                f"{where}.instruction must be a string of at most "
                f"{MAX_INSTRUCTION_CHARS} characters"
            )
            instruction = None
        max_tokens = data.get("max_tokens", DEFAULT_CLASSIFIER_TOKENS)
        if not _int_in(max_tokens, 1, MAX_CLASSIFIER_TOKENS):
            self.problems.append(
                f"{where}.max_tokens must be an integer from 1 to {MAX_CLASSIFIER_TOKENS}"
            )
            max_tokens = DEFAULT_CLASSIFIER_TOKENS
        floor = data.get("min_confidence")
        if floor is not None and not _number_in(floor, 0.0, 1.0):
            self.problems.append(f"{where}.min_confidence must be a number from 0 to 1")
            floor = None
        cache = data.get("cache_seconds", DEFAULT_CACHE_SECONDS)
        if not _number_in(cache, 0.0, 86_400.0):
            self.problems.append(f"{where}.cache_seconds must be a number from 0 to 86400")
            cache = DEFAULT_CACHE_SECONDS
        return Classifier(adapter, labels, instruction, max_tokens, floor, float(cache))

    def _labels(self, value: Any) -> dict[str, str]:
        where = "classifier.labels"
        if not isinstance(value, dict) or not value or len(value) > MAX_LABELS:
            self.problems.append(f"{where} must map 1 to {MAX_LABELS} labels to targets")
            return {}
        labels: dict[str, str] = {}
        seen: set[str] = set()
        for label, target in value.items():
            text = label.strip() if isinstance(label, str) else ""
            if not text or len(text) > MAX_LABEL_CHARS or text != label_text(text):
                self.problems.append(
                    f"{where}: label {label!r} must be 1 to {MAX_LABEL_CHARS} characters "
                    "with no surrounding spaces, quotes or final period"
                )
                continue
            if text.casefold() in seen:
                self.problems.append(
                    f"{where}: label {label!r} is given twice (labels ignore case)"
                )
                continue
            seen.add(text.casefold())
            labels[text] = self._target(target, f"{where}[{label!r}]")
        return labels


def _known_field(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    if name.startswith(METADATA_PREFIX):
        return 0 < len(name) - len(METADATA_PREFIX) <= 64
    return name in FIELDS


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number_in(value: Any, low: float, high: float) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and low <= value <= high


def confusion(pairs: Iterable[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """(expected, chosen) target pairs counted as expected -> chosen -> count."""
    table: dict[str, dict[str, int]] = {}
    for expected, chosen in pairs:
        row = table.setdefault(expected, {})
        row[chosen] = row.get(chosen, 0) + 1
    return table


def accuracy(table: Mapping[str, Mapping[str, int]]) -> float:
    """The share of a confusion table on its diagonal (0.0 for an empty one)."""
    total = sum(sum(row.values()) for row in table.values())
    right = sum(row.get(expected, 0) for expected, row in table.items())
    return right / total if total else 0.0
