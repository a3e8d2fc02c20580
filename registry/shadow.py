"""Shadow results: how a candidate version answers copies of production's requests.

The ``shadow`` alias (``lifecycle.shadow``; its weight is the share of production requests
copied) names the candidate. The gateway sends the copies after the real answers, never
returns them, and hands the answer texts over in batches (``ShadowStore.add``). Here
each pair of answers (production's, the candidate's) is compared: they *agree* when their
texts are equal after stripping surrounding whitespace; and a *JSON check* applies when
production's version was trained by a job with a JSON schema (the candidate's answer must
validate against it) or, without one, when production's answer is a JSON object or array
(the candidate's must be one too).

The counts are running sums per (candidate version, production version), added in SQL
(an upsert that increments), so concurrent gateways never lose each other's counts.
``record_eval`` turns the sums for the current production version into the candidate's
eval results in suite ``shadow`` (``agreement``, and ``json_valid`` where a check
applied), with their sample counts: promotion gates use them like any other result.

Everything is tenant-scoped: a foreign adapter answers exactly like an unknown one.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from sqlalchemy import UniqueConstraint
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Field, Session, SQLModel, select

from registry import lifecycle
from registry.errors import Conflict
from registry.jobs import FineTuningJob
from registry.models import (
    PRODUCTION,
    SHADOW,
    AdapterVersion,
    Alias,
    EvalResult,
    timestamp_column,
    utcnow,
)
from registry.registry import Registry, Score
from registry.store import Store
from registry.values import Actor

SUITE = "shadow"
"""The eval suite shadow results are recorded in."""
AGREEMENT = "agreement"
JSON_VALID = "json_valid"


class ShadowResult(SQLModel, table=True):
    """Running sums of one candidate version's shadow answers against one production version."""

    __tablename__ = "shadow_results"
    __table_args__ = (UniqueConstraint("candidate_version_id", "production_version_id"),)

    id: int | None = Field(default=None, primary_key=True)
    candidate_version_id: int = Field(foreign_key="adapter_versions.id", index=True)
    production_version_id: int = Field(foreign_key="adapter_versions.id")
    compared: int = 0
    """Copies the candidate answered, compared with production's answer."""
    agreed: int = 0
    """Of those, the ones whose texts equal production's after stripping whitespace."""
    json_checked: int = 0
    """Comparisons a JSON check applied to (a schema, or a JSON answer from production)."""
    json_valid: int = 0
    """Of those, the ones the candidate's answer passed."""
    failed: int = 0
    """Copies sent that the candidate did not answer (an error, a timeout)."""
    prompt_tokens: int = 0
    """Tokens the copies used (metered here, charged to no tenant's limits)."""
    completion_tokens: int = 0
    updated_at: dt.datetime = timestamp_column()


_SUMS = (
    "compared",
    "agreed",
    "json_checked",
    "json_valid",
    "failed",
    "prompt_tokens",
    "completion_tokens",
)


@dataclass
class ShadowBatch:
    """What one gateway saw of one candidate since its last flush."""

    tenant_id: int
    adapter: str
    candidate: int
    """The candidate's version number."""
    production: int
    """The number of the production version that answered the real requests."""
    pairs: list[tuple[list[str], list[str]]] = field(default_factory=list)
    """(production's answer texts, the candidate's), one per choice, per copy answered."""
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def agrees(production: Sequence[str], candidate: Sequence[str]) -> bool:
    """Whether the answers are the same text, choice by choice, whitespace around aside."""
    return [t.strip() for t in production] == [t.strip() for t in candidate]


def _structured(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict | list)


def _complies(text: str, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
        return False
    return True


def json_check(
    production: Sequence[str], candidate: Sequence[str], schema: dict[str, Any] | None
) -> tuple[int, int]:
    """(1 if a JSON check applies to this pair else 0, 1 if the candidate passed it)."""
    if schema is not None:
        return 1, int(bool(candidate) and all(_complies(t, schema) for t in candidate))
    if not production or not all(_structured(t) for t in production):
        return 0, 0
    return 1, int(bool(candidate) and all(_structured(t) for t in candidate))


def sums_of(batch: ShadowBatch, schema: dict[str, Any] | None) -> dict[str, int]:
    """The counts ``batch`` adds to its row."""
    sums = dict.fromkeys(_SUMS, 0)
    for production, candidate in batch.pairs:
        checked, valid = json_check(production, candidate, schema)
        sums["compared"] += 1
        sums["agreed"] += agrees(production, candidate)
        sums["json_checked"] += checked
        sums["json_valid"] += valid
    sums["failed"] = batch.failed
    sums["prompt_tokens"] = batch.prompt_tokens
    sums["completion_tokens"] = batch.completion_tokens
    return sums


@dataclass(frozen=True)
class ShadowStatus:
    """An adapter's shadow alias and the results of its candidate against production."""

    adapter: str
    version: int | None
    """The candidate (None: no shadow alias)."""
    share: float | None
    production: int | None
    """The production version compared against (None: none)."""
    result: ShadowResult | None
    """The running sums (None: nothing compared yet)."""

    def to_json(self) -> dict[str, Any]:
        row = self.result or ShadowResult(candidate_version_id=0, production_version_id=0)
        sums = {name: getattr(row, name) for name in _SUMS}
        sums["json_passed"] = sums.pop(JSON_VALID)  # the key names the share, as in the suite
        return {
            "object": "adapter.shadow",
            "adapter": self.adapter,
            "version": self.version,
            "share": self.share,
            "production_version": self.production,
            "results": {
                **sums,
                AGREEMENT: row.agreed / row.compared if row.compared else None,
                JSON_VALID: row.json_valid / row.json_checked if row.json_checked else None,
                "updated_at": self.result.updated_at.isoformat() if self.result else None,
            },
        }


class ShadowStore(Store):
    """Shadow sums: added by gateways, shown, and recorded as eval results."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.database, self.blobs, self.limits = registry.database, registry.blobs, registry.limits

    def add(self, batch: ShadowBatch) -> None:
        """Add a batch's comparisons and counts to its row, in one statement."""
        with self._write() as s:
            adapter = self._own_adapter(s, batch.tenant_id, batch.adapter)
            candidate = self._version(s, adapter, batch.candidate)
            production = self._version(s, adapter, batch.production)
            sums = sums_of(batch, self._schema(s, production))
            key = {"candidate_version_id": candidate.id, "production_version_id": production.id}
            insert = pg_insert if self.database.dialect.name == "postgresql" else sqlite_insert
            table = ShadowResult.__table__  # type: ignore[attr-defined]
            stmt = insert(table).values(**key, **sums, updated_at=utcnow())
            update: dict[str, Any] = {k: table.c[k] + stmt.excluded[k] for k in sums}
            update["updated_at"] = stmt.excluded["updated_at"]
            s.execute(stmt.on_conflict_do_update(index_elements=list(key), set_=update))

    def status(self, tenant_id: int, name: str) -> ShadowStatus:
        """The adapter's shadow alias and its candidate's sums against production now."""
        with self._read() as s:
            adapter = self._own_adapter(s, tenant_id, name)
            assert adapter.id is not None
            aliases = lifecycle.aliases(s, adapter.id)
            shadow = aliases.get(SHADOW)
            candidate, current = _aliased(s, aliases, SHADOW), _aliased(s, aliases, PRODUCTION)
            result = self._result(s, candidate, current)
        return ShadowStatus(
            name,
            candidate.number if candidate else None,
            shadow.weight if shadow else None,
            current.number if current else None,
            result,
        )

    def record_eval(
        self, tenant_id: int, name: str, number: int | None, actor: Actor
    ) -> list[EvalResult]:
        """Record version ``number``'s sums against the current production version as its
        ``shadow`` eval results (``number`` None: the shadow alias's version)."""
        with self._write() as s:
            adapter = self._own_adapter(s, tenant_id, name)
            assert adapter.id is not None
            aliases = lifecycle.aliases(s, adapter.id)
            if number is None:
                if SHADOW not in aliases:
                    raise Conflict("the adapter has no shadow alias; name the version to record")
                candidate = _aliased(s, aliases, SHADOW)
            else:
                candidate = self._version(s, adapter, number)
            assert candidate is not None
            current = _aliased(s, aliases, PRODUCTION)
            if current is None:
                raise Conflict("the adapter has no production version the shadow compared with")
            row = self._result(s, candidate, current)
            if row is None or row.compared == 0:
                raise Conflict(
                    f"version {candidate.number} has answered no shadow copies of production "
                    f"version {current.number}'s requests yet; set a shadow share and wait "
                    "for traffic"
                )
            return [
                self.registry.add_eval_result_in(s, candidate, score, actor)
                for score in _scores(row)
            ]

    def _result(
        self, s: Session, candidate: AdapterVersion | None, production: AdapterVersion | None
    ) -> ShadowResult | None:
        if candidate is None or production is None:
            return None
        return s.exec(
            select(ShadowResult).where(
                ShadowResult.candidate_version_id == candidate.id,
                ShadowResult.production_version_id == production.id,
            )
        ).first()

    def _schema(self, s: Session, production: AdapterVersion) -> dict[str, Any] | None:
        """The JSON schema of the job that trained ``production``, if it had one."""
        if production.training_job is None:
            return None
        job = s.get(FineTuningJob, production.training_job)
        return job.json_schema if job is not None else None


def _aliased(s: Session, aliases: dict[str, Alias], name: str) -> AdapterVersion | None:
    """The version alias ``name`` points at (None: no such alias)."""
    alias = aliases.get(name)
    return s.get(AdapterVersion, alias.version_id) if alias else None


def _scores(row: ShadowResult) -> list[Score]:
    scores = [Score(SUITE, AGREEMENT, row.agreed / row.compared, row.compared)]
    if row.json_checked:
        scores.append(Score(SUITE, JSON_VALID, row.json_valid / row.json_checked, row.json_checked))
    return scores
