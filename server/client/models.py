"""What the client returns: small frozen dataclasses over the gateway's JSON objects.

Each keeps the object as the server sent it in ``raw`` (``--json`` prints that), so a field
the server adds later is never lost to a client that does not know it yet.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def _build(cls: type[T], data: dict[str, Any], **extra: Any) -> T:
    """``cls`` from ``data``'s keys of the same names (missing ones: None), plus ``extra``."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    values = {name: data.get(name) for name in names if name not in extra and name != "raw"}
    built: T = cls(**values, **extra, raw=data)  # type: ignore[call-arg]
    return built


@dataclass(frozen=True)
class VersionInfo:
    """One immutable version of an adapter."""

    version: int
    """Its number, 1 upwards."""
    lora_name: str
    """The name engines load it under."""
    fingerprint: str
    """sha256 of its canonical files."""
    rank: int
    state: str
    """``active``, ``retired`` or ``archived``."""
    base_id: int
    """The base model it was trained on (its registry id)."""
    base_deprecated: bool
    size_bytes: int
    created_at: str
    """ISO 8601, UTC."""
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VersionInfo:
        return _build(cls, data)


@dataclass(frozen=True)
class AliasInfo:
    """Where an alias (``production``, ``canary``...) points."""

    version: int
    weight: float
    """The share of traffic (a canary's; 1.0 for the others)."""


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter: a name, its aliases and (from ``get_adapter``) its versions."""

    name: str
    description: str | None
    created_at: str
    aliases: dict[str, AliasInfo]
    versions: list[VersionInfo]
    """Every version, oldest first; empty in a listing (ask ``get_adapter``)."""
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AdapterInfo:
        aliases = {
            name: AliasInfo(int(t["version"]), float(t.get("weight", 1.0)))
            for name, t in (data.get("aliases") or {}).items()
        }
        versions = [VersionInfo.from_json(v) for v in data.get("versions") or []]
        return _build(cls, data, name=data["id"], aliases=aliases, versions=versions)


@dataclass(frozen=True)
class EvalScore:
    """One eval result of a version."""

    suite: str
    metric: str
    value: float
    sample_count: int | None
    dataset_sha256: str | None
    created_at: str
    created_by: str
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalScore:
        return _build(cls, data)


@dataclass(frozen=True)
class VersionEvals:
    """A version's latest result of every (suite, metric), for the eval table."""

    version: int
    state: str
    aliases: list[str]
    evals: list[EvalScore]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VersionEvals:
        evals = [EvalScore.from_json(e) for e in data.get("evals") or []]
        return _build(cls, data, aliases=list(data.get("aliases") or []), evals=evals)


@dataclass(frozen=True)
class GateRule:
    """A promotion gate: a version's result of ``suite``/``metric`` must pass it."""

    suite: str
    metric: str
    min_value: float | None = None
    """The result must be at least this (at most, when lower is better)."""
    max_regression: float | None = None
    """How much worse than the production version's result it may be."""
    higher_is_better: bool = True
    max_below_base: float | None = None
    """Capability suites only: how far below the base's reference it may fall."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GateRule:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class TrainingFile:
    """An uploaded JSONL training file."""

    id: str
    filename: str
    bytes: int
    purpose: str
    line_count: int | None
    sha256: str | None
    created_at: int
    """Unix seconds."""
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingFile:
        return _build(cls, data)


TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
"""A job in one of these never changes again."""


@dataclass(frozen=True)
class FineTuningJob:
    """A fine-tuning job (OpenAI's shape plus loraplex's ``adapter_name``)."""

    id: str
    status: str
    """``queued``, ``running``, ``succeeded``, ``failed`` or ``cancelled``."""
    model: str
    training_file: str
    fine_tuned_model: str | None
    """``adapter@N`` once it succeeded."""
    adapter_name: str | None
    """The adapter the result registers under."""
    created_at: int
    finished_at: int | None
    error: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FineTuningJob:
        return _build(cls, data)


@dataclass(frozen=True)
class JobEvent:
    """One event of a job (a message, or a training step's metrics in ``data``)."""

    id: str
    """``ftevent-N``; N grows with time."""
    created_at: int
    level: str
    message: str
    type: str
    """``message`` or ``metrics``."""
    data: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def number(self) -> int:
        """N of ``ftevent-N``: the cursor ``follow_job_events`` keeps."""
        return int(self.id.removeprefix("ftevent-"))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobEvent:
        return _build(cls, data)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint a job saved at a training step."""

    id: str
    step_number: int
    fine_tuned_model_checkpoint: str
    metrics: dict[str, Any]
    created_at: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint:
        return _build(cls, data)


@dataclass(frozen=True)
class UsageReport:
    """The tenant's usage by day, adapter and version over ``since``..``until``."""

    since: str
    until: str
    lines: list[dict[str, Any]]
    """``{"day", "adapter", "version", "requests", "prompt_tokens", ...}`` each."""
    totals: dict[str, int]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UsageReport:
        return _build(cls, data, lines=list(data.get("data") or []))
