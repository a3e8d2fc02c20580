"""Capability regression suites: a small generic set registered with a base model.

An operator registers, per base, named suites of ``{"prompt", "answer"}`` examples. The
base alone's score on a suite is the reference: the fine-tuning worker measures it the
first time a job on that base is evaluated (and stores it here, ``set_reference``), then
scores every candidate on the same examples with the same evaluator. A candidate's
results are eval results of its version under the suite label ``capability:<name>``
(the base's reference beside them as ``capability:<name>/base``), so promotion gates
can hold it to the reference (``Gate.max_below_base``).

Replacing a suite's examples clears its reference: a reference always describes the
examples it was measured on (both carry the examples' SHA-256). Every write is audited.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, UniqueConstraint
from sqlmodel import Field, Session, SQLModel, col, select

from registry import audit
from registry.errors import Conflict, InvalidRequest, NotFound
from registry.models import BaseModelRecord, timestamp_column, utcnow
from registry.store import Store
from registry.values import Actor

SUITE_PREFIX = "capability:"
"""Eval suites named ``capability:<name>`` hold a version's scores on a capability suite."""
BASE_SUFFIX = "/base"
"""``capability:<name>/base``: the base alone's reference, stored beside a version's score."""
MAX_EXAMPLES = 200
"""A capability suite is a small set: every candidate (and the base once) answers all of it."""
MAX_TEXT_CHARS = 2000
"""Longest prompt or answer of one example."""
MAX_METRICS = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class CapabilitySuite(SQLModel, table=True):
    __tablename__ = "capability_suites"
    __table_args__ = (UniqueConstraint("base_id", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    base_id: int = Field(foreign_key="base_models.id", index=True)
    name: str = Field(max_length=64)
    examples: list[dict[str, str]] = Field(default_factory=list, sa_type=JSON)
    """``{"prompt", "answer"}`` pairs, in order."""
    examples_sha256: str = Field(max_length=64)
    """SHA-256 of the examples' canonical JSON (what a reference was measured on)."""
    created_by: str = Field(default="", max_length=256)
    created_at: dt.datetime = timestamp_column()


class CapabilityReference(SQLModel, table=True):
    """The base alone's scores on one suite's current examples."""

    __tablename__ = "capability_references"

    id: int | None = Field(default=None, primary_key=True)
    suite_id: int = Field(foreign_key="capability_suites.id", unique=True)
    examples_sha256: str = Field(max_length=64)
    metrics: dict[str, float] = Field(default_factory=dict, sa_type=JSON)
    """Metric name -> the base's value (``exact_match``, ``loss``...)."""
    sample_count: int
    details: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    """How it was measured: the evaluator, its budget, the library versions."""
    created_by: str = Field(default="", max_length=256)
    created_at: dt.datetime = timestamp_column()


@dataclass(frozen=True)
class Reference:
    """A base's reference scores on a suite."""

    metrics: dict[str, float]
    sample_count: int
    examples_sha256: str
    details: dict[str, Any]
    created_by: str
    created_at: dt.datetime


@dataclass(frozen=True)
class Suite:
    """A base's capability suite and, once measured, the base's reference on it."""

    base_id: int
    name: str
    examples: list[dict[str, str]]
    examples_sha256: str
    created_by: str
    created_at: dt.datetime
    reference: Reference | None

    @property
    def label(self) -> str:
        """The eval suite a version's scores on it are stored under."""
        return suite_label(self.name)


def suite_label(name: str) -> str:
    return f"{SUITE_PREFIX}{name}"


def suite_name(label: str) -> str | None:
    """The capability suite an eval suite label names (``capability:<name>``), or None."""
    if not label.startswith(SUITE_PREFIX):
        return None
    return label[len(SUITE_PREFIX) :] or None


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidRequest(
            f"capability suite name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def check_examples(examples: Sequence[Any]) -> list[dict[str, str]]:
    """The examples as ``{"prompt", "answer"}`` dicts; ``InvalidRequest`` names every problem
    (up to ten) when they are not 1..``MAX_EXAMPLES`` pairs of non-blank bounded strings."""
    if not examples:
        raise InvalidRequest("a capability suite needs at least one example")
    if len(examples) > MAX_EXAMPLES:
        raise InvalidRequest(
            f"a capability suite holds at most {MAX_EXAMPLES} examples, got {len(examples)}"
        )
    problems = [p for i, e in enumerate(examples, start=1) for p in _example_problems(i, e)]
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise InvalidRequest("bad capability examples: " + "; ".join(problems[:10]) + more)
    return [{"prompt": e["prompt"], "answer": e["answer"]} for e in examples]


def _example_problems(number: int, example: Any) -> list[str]:
    if not isinstance(example, Mapping):
        return [f"example {number} is not an object with 'prompt' and 'answer'"]
    problems = []
    for key in ("prompt", "answer"):
        value = example.get(key)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"example {number}: {key!r} must be a non-blank string")
        elif len(value) > MAX_TEXT_CHARS:
            problems.append(f"example {number}: {key!r} is over {MAX_TEXT_CHARS} characters")
    extra = sorted(set(example) - {"prompt", "answer"})
    if extra:
        problems.append(f"example {number}: unknown field(s) {', '.join(map(repr, extra))}")
    return problems


def examples_sha256(examples: Sequence[Mapping[str, str]]) -> str:
    canonical = json.dumps(list(examples), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _check_metrics(metrics: Mapping[str, float], sample_count: int) -> dict[str, float]:
    if not metrics or len(metrics) > MAX_METRICS:
        raise InvalidRequest(f"a reference needs 1 to {MAX_METRICS} metrics, got {len(metrics)}")
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        raise InvalidRequest(f"reference metrics must be finite numbers: {', '.join(bad)}")
    if sample_count < 1:
        raise InvalidRequest(f"a reference needs a sample count of at least 1, got {sample_count}")
    return {str(k): float(v) for k, v in metrics.items()}


def _subject(base: BaseModelRecord, name: str) -> str:
    return f"base:{base.name}@{base.revision}/capability:{name}"


def _suite_row(s: Session, base_id: int, name: str, lock: bool = False) -> CapabilitySuite | None:
    query = select(CapabilitySuite).where(
        CapabilitySuite.base_id == base_id, CapabilitySuite.name == name
    )
    return s.exec(query.with_for_update() if lock else query).first()


def _reference_row(s: Session, suite: CapabilitySuite) -> CapabilityReference | None:
    query = select(CapabilityReference).where(CapabilityReference.suite_id == suite.id)
    row = s.exec(query).first()
    # A reference of other examples describes nothing current (set_suite deletes it anyway).
    return row if row is not None and row.examples_sha256 == suite.examples_sha256 else None


def reference_value(s: Session, base_id: int, label: str, metric: str) -> float | None:
    """The base's reference value of ``metric`` on the suite ``label`` names, in the
    caller's session; None when there is no such suite, reference or metric."""
    name = suite_name(label)
    suite = None if name is None else _suite_row(s, base_id, name)
    reference = None if suite is None else _reference_row(s, suite)
    return None if reference is None else reference.metrics.get(metric)


def _suite_of(row: CapabilitySuite, reference: CapabilityReference | None) -> Suite:
    shown = None
    if reference is not None:
        shown = Reference(
            dict(reference.metrics),
            reference.sample_count,
            reference.examples_sha256,
            dict(reference.details),
            reference.created_by,
            reference.created_at,
        )
    return Suite(
        row.base_id,
        row.name,
        list(row.examples),
        row.examples_sha256,
        row.created_by,
        row.created_at,
        shown,
    )


class CapabilityStore(Store):
    """Capability suites of bases and the bases' reference scores on them."""

    def __init__(self, registry: Store) -> None:
        """On the registry's database (any ``Store``: ``registry.Registry`` is one)."""
        self.database, self.blobs, self.limits = registry.database, registry.blobs, registry.limits

    def set_suite(
        self, base: BaseModelRecord, name: str, examples: Sequence[Any], actor: Actor
    ) -> Suite:
        """Create or replace a base's suite; replacing it clears its reference."""
        check_name(name)
        checked = check_examples(examples)
        digest = examples_sha256(checked)
        assert base.id is not None
        with self._write() as s:
            row = _suite_row(s, base.id, name, lock=True)
            before = None if row is None else {"examples_sha256": row.examples_sha256}
            if row is None:
                row = CapabilitySuite(base_id=base.id, name=name, examples_sha256=digest)
            else:
                for old in s.exec(
                    select(CapabilityReference).where(CapabilityReference.suite_id == row.id)
                ):
                    s.delete(old)
            row.examples, row.examples_sha256 = checked, digest
            row.created_by, row.created_at = actor.name, utcnow()
            s.add(row)
            s.flush()
            after = {"examples": len(checked), "examples_sha256": digest}
            audit.record(
                s, actor.name, "base.capability", _subject(base, name), before=before, after=after
            )
            return _suite_of(row, None)

    def get_suite(self, base: BaseModelRecord, name: str) -> Suite:
        """The suite with its reference (None until measured); ``NotFound`` if none."""
        assert base.id is not None
        with self._read() as s:
            row = _suite_row(s, base.id, name)
            if row is None:
                raise _no_suite(base, name)
            return _suite_of(row, _reference_row(s, row))

    def suites(self, base: BaseModelRecord) -> list[Suite]:
        """Every suite of the base, by name."""
        with self._read() as s:
            query = select(CapabilitySuite).where(CapabilitySuite.base_id == base.id)
            rows = s.exec(query.order_by(col(CapabilitySuite.name))).all()
            return [_suite_of(row, _reference_row(s, row)) for row in rows]

    def set_reference(
        self,
        base: BaseModelRecord,
        name: str,
        metrics: Mapping[str, float],
        actor: Actor,
        *,
        sample_count: int,
        examples_sha256: str,
        details: Mapping[str, Any] | None = None,
    ) -> Reference:
        """Store the base's scores on the suite's examples, measured on ``examples_sha256``;
        ``Conflict`` when the suite was replaced since (its reference would be of others)."""
        values = _check_metrics(metrics, sample_count)
        assert base.id is not None
        with self._write() as s:
            row = _suite_row(s, base.id, name, lock=True)
            if row is None:
                raise _no_suite(base, name)
            if row.examples_sha256 != examples_sha256:
                raise Conflict(
                    f"capability suite {name!r} of base {base.name!r} was replaced while it "
                    "was being measured; measure it again"
                )
            for old in s.exec(
                select(CapabilityReference).where(CapabilityReference.suite_id == row.id)
            ):
                s.delete(old)
            s.flush()
            reference = CapabilityReference(
                suite_id=row.id or 0,
                examples_sha256=examples_sha256,
                metrics=values,
                sample_count=sample_count,
                details=dict(details or {}),
                created_by=actor.name,
            )
            s.add(reference)
            after = {"metrics": values, "sample_count": sample_count}
            audit.record(s, actor.name, "base.capability.reference", _subject(base, name),
                         after=after)  # fmt: skip
            s.flush()
            shown = _suite_of(row, reference).reference
        assert shown is not None
        return shown

    def reference(self, base: BaseModelRecord, name: str) -> Reference | None:
        """The base's reference on the suite; None until measured. ``NotFound`` if no suite."""
        return self.get_suite(base, name).reference


def _no_suite(base: BaseModelRecord, name: str) -> NotFound:
    return NotFound(
        f"base {base.name!r} has no capability suite {name!r}; register it with "
        f"`loraplex bases capability set {base.name} {name} FILE.jsonl`"
    )
