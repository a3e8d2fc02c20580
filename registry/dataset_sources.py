"""Fine-tuning examples made from captured completions and their feedback.

A stored chat completion becomes a supervised example (its request's messages, then an
assistant answer) when its feedback says the answer was right or gave the right one:

- thumbs up, or a rating of 4 or 5, and no correction: the answer as served;
- a correction: the corrected answer instead (whatever the thumbs said).

Only a completion's latest feedback counts: a user who changed their mind is heard last.
Thumbs down with no correction teaches nothing supervised and is left out.

Preference pairs (DPO) come from the same feedback: a correction is preferred to the
answer it corrects, and for one prompt (the same request messages) a liked answer is
preferred to a disliked one. They use the fine-tuning file's preference format:
``{"prompt": [messages], "chosen": {assistant}, "rejected": {assistant}}``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from registry.captures import CaptureStore, CompletionQuery, Feedback, StoredCompletion
from registry.errors import InvalidRequest

Method = Literal["supervised", "dpo"]
Verdict = Literal["good", "bad", "corrected"]
GOOD_RATING = 4
"""Ratings at or above this count as a thumbs up (on OpenAI's 1-5 style scale)."""
PAGE = 500


@dataclass(frozen=True)
class CompletionFilter:
    """Which stored completions feed a dataset version."""

    adapter: str | None = None
    """Served by this adapter (None: any, the base model included)."""
    version: int | None = None
    """Served by this version of it."""
    model: str | None = None
    """``model`` as clients asked for it."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Every key here, with this value, in the completion's metadata."""
    created_after: dt.datetime | None = None
    created_before: dt.datetime | None = None
    method: Method = "supervised"

    def to_json(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "version": self.version,
            "model": self.model,
            "metadata": self.metadata,
            "created_after": _iso(self.created_after),
            "created_before": _iso(self.created_before),
            "method": self.method,
        }


@dataclass(frozen=True)
class Made:
    """An example made from completions: its content, and the completions it came from."""

    content: dict[str, Any]
    completions: tuple[StoredCompletion, ...]


@dataclass(frozen=True)
class Judged:
    """A completion with feedback, read for training."""

    row: StoredCompletion
    prompt: list[dict[str, Any]]
    served: dict[str, Any]
    """The answer as served."""
    verdict: Verdict
    taught: dict[str, Any] | None
    """The answer to teach: the correction, the liked answer, or None (disliked)."""


def made_from(
    captures: CaptureStore, tenant_id: int, wanted: CompletionFilter
) -> tuple[list[Made], int]:
    """The examples the filter's completions make, and how many completions with feedback
    were read."""
    judged = list(_judged(captures, tenant_id, wanted))
    if wanted.method == "dpo":
        return _pairs(judged), len(judged)
    made = [Made(_chat(j.prompt, j.taught), (j.row,)) for j in judged if j.taught is not None]
    return made, len(judged)


def _judged(captures: CaptureStore, tenant_id: int, wanted: CompletionFilter) -> Iterator[Judged]:
    for row, latest in _with_latest_feedback(captures, tenant_id, wanted):
        request, response = captures.bodies(row)
        prompt, served = _prompt(request), _served(response)
        if prompt is None or served is None:
            continue  # not a chat completion with a text answer: nothing to learn from
        verdict = _verdict(latest)
        taught = {
            "corrected": {"role": "assistant", "content": latest.correction},
            "good": served,
            "bad": None,
        }[verdict]
        yield Judged(row, prompt, served, verdict, taught)


def _with_latest_feedback(
    captures: CaptureStore, tenant_id: int, wanted: CompletionFilter
) -> Iterator[tuple[StoredCompletion, Feedback]]:
    after: str | None = None
    while True:
        query = CompletionQuery(
            after=after,
            limit=PAGE,
            order="asc",
            model=wanted.model,
            adapter=wanted.adapter,
            version=wanted.version,
            metadata=wanted.metadata,
            created_after=wanted.created_after,
            created_before=wanted.created_before,
        )
        rows = captures.list_completions(tenant_id, query)
        latest = captures.latest_feedback(tenant_id, rows)
        for row in rows:
            if row.id in latest:
                yield row, latest[row.id]
        if len(rows) < PAGE:
            return
        after = rows[-1].completion_id


def _verdict(feedback: Feedback) -> Verdict:
    if feedback.correction:
        return "corrected"
    if feedback.thumbs == "up" or (feedback.rating is not None and feedback.rating >= GOOD_RATING):
        return "good"
    return "bad"


def _prompt(request: dict[str, Any]) -> list[dict[str, Any]] | None:
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    kept = [
        {"role": m["role"], "content": m["content"]}
        for m in messages
        if isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m
    ]
    return kept if len(kept) == len(messages) else None


def _served(response: dict[str, Any]) -> dict[str, Any] | None:
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message") or {}
    content = message.get("content") if isinstance(message, dict) else None
    return {"role": "assistant", "content": content} if isinstance(content, str) else None


def _chat(prompt: list[dict[str, Any]], answer: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [*prompt, answer]}


def _pairs(judged: Sequence[Judged]) -> list[Made]:
    """Corrections over what they corrected; per prompt, a liked or corrected answer over
    each disliked one."""
    made: list[Made] = []
    liked: dict[str, tuple[Judged, dict[str, Any]]] = {}
    disliked: dict[str, list[Judged]] = {}
    for j in judged:
        key = json.dumps(j.prompt, sort_keys=True)
        if j.taught is None:
            disliked.setdefault(key, []).append(j)
            continue
        liked.setdefault(key, (j, j.taught))
        if j.verdict == "corrected" and j.taught != j.served:
            made.append(Made(_pair(j.prompt, j.taught, j.served), (j.row,)))
    for key, (good, chosen) in liked.items():
        for bad in disliked.get(key, []):
            if bad.served != chosen:
                made.append(Made(_pair(good.prompt, chosen, bad.served), (good.row, bad.row)))
    return made


def _pair(
    prompt: list[dict[str, Any]], chosen: dict[str, Any], rejected: dict[str, Any]
) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def check_filter(wanted: CompletionFilter) -> None:
    if wanted.version is not None and wanted.adapter is None:
        raise InvalidRequest("a version filter needs the adapter it is a version of")


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()
