"""Routed models: one model name behind which the gateway picks an adapter or a base per request.

A tenant's routed model (``support-suite``) has numbered versions; each holds a routing
policy and the model names the policy references. The policy is an opaque JSON document
here: the ``router`` package parses and validates it (the registry imports nothing of
the router), and hands over the names it references, which this store checks: each is
the served name of a registered base, or one of the tenant's own adapters (optionally
``adapter@N`` or ``adapter:alias``). A routed model never references another routed
model, and its name is no adapter's and no base's, so a request's ``model`` string
names one thing only (``Registry.push_in`` refuses an adapter named like a routed model).

The first version of a new routed model goes live at once; later ones wait for
``promote``, which checks the routed model's gates against routing evals (accuracy of
the chosen model on labelled examples, per suite). Every promote, rollback and delete
writes a history row; ``rollback`` walks the promotes backwards like adapters' do.

``delete`` is soft: the row gets a tombstone (its own id) so the name is free for a new
routed model while the old one's versions, evals and history stay for audit.

Everything is tenant-scoped: another tenant's routed model answers exactly like an
unknown one, and a reference to another tenant's adapter exactly like an unknown name.
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import JSON, UniqueConstraint, func
from sqlmodel import Field, Session, SQLModel, col, select

from registry import audit
from registry.adapter_names import MAX_LENGTH, check_adapter_name
from registry.errors import Conflict, GateFailed, InvalidRequest, NotFound, PermissionDenied
from registry.gates import TOLERANCE
from registry.models import Adapter, AdapterVersion, BaseModelRecord, timestamp_column, utcnow
from registry.store import NUL, Store
from registry.values import Actor

ROUTING_SUITE = "routing"
"""The default suite of routing evals."""
MAX_POLICY_BYTES = 64 * 1024
"""A policy document's size at most, serialized as compact JSON (UTF-8)."""
MAX_CONFUSION_BYTES = 64 * 1024
"""A routing eval's confusion matrix's size at most, serialized the same way."""
MAX_REFERENCES = 256
"""Model names one policy may reference at most."""
MAX_SUITE_LENGTH = 128

SAVE, PROMOTE, ROLLBACK, DELETE = (
    "routed_model.save",
    "routed_model.promote",
    "routed_model.rollback",
    "routed_model.delete",
)
GATES, EVAL, GATE_FAILED = "routed_model.gates", "routed_model.eval", "routed_model.gate_failed"
"""Audit actions (``registry.events`` makes all but ``EVAL`` public events)."""
CREATE = "routed_model.create"
"""History action of a new routed model's first version going live (not an audit action)."""

# A reference to an adapter, as a request's ``model`` spells it (``router.names`` grammar).
_ADAPTER_REF = re.compile(
    rf"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_LENGTH - 1}}})"
    rf"(?:@(?P<version>[1-9][0-9]{{0,8}})|:(?P<alias>[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}))?"
)


class RoutedModel(SQLModel, table=True):
    """A tenant's routed model; a deleted one keeps its row, with a tombstone."""

    __tablename__ = "routed_models"
    __table_args__ = (UniqueConstraint("tenant_id", "name", "tombstone"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenants.id", index=True)
    name: str = Field(max_length=128)
    tombstone: int = 0
    """0 while the routed model exists; its own id once deleted, which frees the name
    (the unique key holds it) without a partial index."""
    live_version: int | None = None
    """The number of the live version (set by the first save: a first version goes live
    at once; a deleted routed model keeps the number it had)."""
    gates: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)
    """The promotion gates, as ``RoutingGate`` fields."""
    created_at: dt.datetime = timestamp_column()
    deleted_at: dt.datetime | None = timestamp_column(nullable=True)


class RoutedModelVersion(SQLModel, table=True):
    __tablename__ = "routed_model_versions"
    __table_args__ = (UniqueConstraint("routed_model_id", "number"),)

    id: int | None = Field(default=None, primary_key=True)
    routed_model_id: int = Field(foreign_key="routed_models.id", index=True)
    number: int
    policy: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    """The routing policy, as the router parses it (opaque here)."""
    references: list[str] = Field(default_factory=list, sa_type=JSON)
    """The model names the policy references, each checked when the version was saved."""
    description: str = Field(default="", max_length=4096)
    created_by: str = Field(default="", max_length=256)
    created_at: dt.datetime = timestamp_column()


class RoutedModelEval(SQLModel, table=True):
    """One routing eval of a version: how often its policy chose the expected model."""

    __tablename__ = "routed_model_evals"

    id: int | None = Field(default=None, primary_key=True)
    version_id: int = Field(foreign_key="routed_model_versions.id", index=True)
    suite: str = Field(max_length=MAX_SUITE_LENGTH)
    accuracy: float
    examples: int
    confusion: dict[str, dict[str, int]] = Field(default_factory=dict, sa_type=JSON)
    """Expected model -> chosen model -> how many examples."""
    created_by: str = Field(default="", max_length=256)
    created_at: dt.datetime = timestamp_column()


class RoutedModelHistory(SQLModel, table=True):
    """Every change of a routed model's live version; rollback walks it backwards."""

    __tablename__ = "routed_model_history"

    id: int | None = Field(default=None, primary_key=True)
    routed_model_id: int = Field(foreign_key="routed_models.id", index=True)
    action: str = Field(max_length=32)
    version_id: int | None = Field(default=None, foreign_key="routed_model_versions.id")
    previous_version_id: int | None = Field(default=None, foreign_key="routed_model_versions.id")
    undone: bool = False
    """A promote a rollback has walked back."""
    actor: str = Field(default="", max_length=256)
    created_at: dt.datetime = timestamp_column()


# -- values -----------------------------------------------------------------


def _check_share(what: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{what} must be a number in [0, 1], not {value!r}")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidRequest(f"{what} {value!r} is outside [0, 1]; pass a share like 0.9")


def _check_suite(suite: str) -> None:
    if not isinstance(suite, str) or not 0 < len(suite) <= MAX_SUITE_LENGTH or NUL in suite:
        raise InvalidRequest(
            f"suite {suite!r} is not valid: use 1-{MAX_SUITE_LENGTH} characters "
            f"(the default is {ROUTING_SUITE!r})"
        )


def _when(value: dt.datetime) -> str:
    if value.tzinfo is None:  # SQLite hands timestamps back naive; they are UTC
        value = value.replace(tzinfo=dt.UTC)
    return value.isoformat()


@dataclass(frozen=True)
class RoutingGate:
    """One promotion gate of a routed model, on the candidate's latest routing eval."""

    suite: str = ROUTING_SUITE
    """The suite the eval must come from."""
    min_accuracy: float | None = None
    """Accuracy the candidate must reach."""
    max_regression: float | None = None
    """How much less accurate than the live version's latest eval on the suite the
    candidate may be (no live eval there: this check passes, with a note)."""

    def __post_init__(self) -> None:
        _check_suite(self.suite)
        _check_share(f"gate {self.suite}: min_accuracy", self.min_accuracy)
        _check_share(f"gate {self.suite}: max_regression", self.max_regression)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RoutedVersion:
    """One version of a routed model."""

    name: str
    number: int
    policy: dict[str, Any]
    references: list[str]
    """The model names the policy references (bases' served names, own adapters)."""
    description: str
    created_by: str
    created_at: dt.datetime
    live: bool
    """Whether it is the live version now."""

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "routed_model.version",
            "routed_model": self.name,
            "version": self.number,
            "policy": self.policy,
            "references": list(self.references),
            "description": self.description,
            "created_by": self.created_by,
            "created_at": _when(self.created_at),
            "live": self.live,
        }


@dataclass(frozen=True)
class RoutingEval:
    """One routing eval of a version."""

    name: str
    number: int
    """The version evaluated."""
    suite: str
    accuracy: float
    """The share of examples whose chosen model was the expected one."""
    examples: int
    confusion: dict[str, dict[str, int]]
    """Expected model -> chosen model -> how many examples."""
    created_at: dt.datetime
    created_by: str

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "routed_model.eval",
            "routed_model": self.name,
            "version": self.number,
            "suite": self.suite,
            "accuracy": self.accuracy,
            "examples": self.examples,
            "confusion": self.confusion,
            "created_at": _when(self.created_at),
            "created_by": self.created_by,
        }


@dataclass(frozen=True)
class RoutedModelInfo:
    """A routed model: its live and latest versions and its gates."""

    name: str
    live_version: int | None
    latest_version: int
    versions: int
    """How many versions it has."""
    gates: list[RoutingGate]
    created_at: dt.datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "routed_model",
            "name": self.name,
            "live_version": self.live_version,
            "latest_version": self.latest_version,
            "versions": self.versions,
            "gates": [g.to_json() for g in self.gates],
            "created_at": _when(self.created_at),
        }


@dataclass(frozen=True)
class LiveRoutedModel:
    """What the gateway needs to route a request for the routed model (it caches it)."""

    name: str
    version: int
    policy: dict[str, Any]


# -- checks -----------------------------------------------------------------


def unknown_routed_model(name: str) -> NotFound:
    # Same words for foreign and unknown names: tenants must not learn what others own.
    return NotFound(
        f"routed model {name!r} does not exist; list your routed models to see the names"
    )


def unknown_reference(names: Sequence[str]) -> InvalidRequest:
    # Same words for another tenant's adapter and for nobody's name.
    listed = ", ".join(repr(n) for n in names)
    return InvalidRequest(
        f"the policy references {listed}, which name(s) no registered base and none of your "
        "adapters; list your adapters and the bases to see the names"
    )


def _serialized_size(what: str, value: Any, limit: int) -> None:
    """``InvalidRequest`` unless ``value`` is JSON (no NaN) of at most ``limit`` bytes."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"the {what} is not a JSON document: {exc}") from None
    size = len(text.encode())
    if size > limit:
        raise InvalidRequest(
            f"the {what} is {size} bytes as compact JSON, over the limit of {limit} bytes "
            f"({limit // 1024} KiB); make it smaller"
        )


def _check_name(name: str) -> None:
    try:
        check_adapter_name(name)
    except InvalidRequest as exc:  # the same rules, in words about routed models
        raise InvalidRequest(str(exc).replace("adapter name", "routed model name", 1)) from None


def _check_confusion(confusion: Any, examples: int) -> None:
    if not isinstance(confusion, dict) or not all(
        isinstance(expected, str)
        and isinstance(row, dict)
        and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in row.items()
        )
        for expected, row in confusion.items()
    ):
        raise InvalidRequest(
            "confusion must map each expected model name to {chosen model name: count}, "
            "with counts non-negative integers"
        )
    _serialized_size("confusion matrix", confusion, MAX_CONFUSION_BYTES)
    total = sum(sum(row.values()) for row in confusion.values())
    if total > examples:
        raise InvalidRequest(
            f"the confusion matrix counts {total} examples, more than the {examples} evaluated"
        )


def _check_eval(accuracy: float, examples: int, suite: str) -> None:
    _check_suite(suite)
    _check_share("accuracy", accuracy)
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise InvalidRequest(f"examples must be a positive integer, not {examples!r}")


def routed_model_named(
    s: Session, tenant_id: int, name: str, lock: bool = False
) -> RoutedModel | None:
    """The tenant's routed model ``name`` (not deleted), if there is one; its row locked
    for the transaction with ``lock``."""
    if NUL in name:  # no name holds one, and PostgreSQL refuses them in queries
        return None
    query = select(RoutedModel).where(
        RoutedModel.tenant_id == tenant_id, RoutedModel.name == name, RoutedModel.tombstone == 0
    )
    return s.exec(query.with_for_update() if lock else query).first()


def refuse_routed_model_name(s: Session, tenant_id: int, name: str) -> None:
    """``Conflict`` when ``name`` is one of the tenant's routed models (an adapter push)."""
    if routed_model_named(s, tenant_id, name) is not None:
        raise Conflict(
            f"{name!r} is one of your routed models, so no adapter may take the name; "
            "push the adapter under another name (or delete the routed model first)"
        )


# -- the store ----------------------------------------------------------------


class RoutedModelStore(Store):
    """Routed models: versions of their policies, evals, gates, promotion and rollback."""

    def __init__(self, registry: Store) -> None:
        # Any Store (the Registry facade in practice): registry.registry imports this
        # module for the name check at push, so it must not import that one back.
        self.database, self.blobs, self.limits = registry.database, registry.blobs, registry.limits

    def save_version(
        self,
        tenant_id: int,
        name: str,
        policy: dict[str, Any],
        references: Collection[str],
        actor: Actor,
        description: str = "",
    ) -> RoutedVersion:
        """Save ``policy`` as the routed model's next version; a new routed model's first
        version goes live at once, later ones wait for ``promote``."""
        _check_name(name)
        if not isinstance(policy, dict):
            raise InvalidRequest("the policy must be a JSON object")
        _serialized_size("policy", policy, MAX_POLICY_BYTES)
        refs = _reference_list(references)
        if not isinstance(description, str) or len(description) > 4096:
            raise InvalidRequest("the description must be a string of at most 4096 characters")

        def save() -> RoutedVersion:
            with self._write() as s:
                return self._save_in(s, tenant_id, name, policy, refs, actor, description)

        return self._retrying(save)

    def _save_in(
        self,
        s: Session,
        tenant_id: int,
        name: str,
        policy: dict[str, Any],
        refs: builtins.list[str],
        actor: Actor,
        description: str,
    ) -> RoutedVersion:
        tenant = self._tenant(s, tenant_id)
        bases = {b.name for b in s.exec(select(BaseModelRecord)).all()}
        self._check_free(s, tenant_id, name, bases)
        self._check_references(s, tenant_id, refs, bases)
        model = routed_model_named(s, tenant_id, name, lock=True)
        if model is None:  # a new routed model (a concurrent save of it fails the insert)
            model = RoutedModel(tenant_id=tenant_id, name=name)
            s.add(model)
            s.flush()
        assert model.id is not None
        last = s.exec(
            select(func.max(RoutedModelVersion.number)).where(
                RoutedModelVersion.routed_model_id == model.id
            )
        ).one()
        row = RoutedModelVersion(
            routed_model_id=model.id,
            number=(last or 0) + 1,
            policy=policy,
            references=refs,
            description=description,
            created_by=actor.name,
        )
        s.add(row)
        s.flush()
        if model.live_version is None:
            model.live_version = row.number
            s.add(model)
            s.add(RoutedModelHistory(
                routed_model_id=model.id, action=CREATE, version_id=row.id, actor=actor.name
            ))  # fmt: skip
        audit.record(
            s,
            actor.name,
            SAVE,
            f"{_subject(tenant.name, name)}@{row.number}",
            tenant_id=tenant_id,
            after={"version": row.number, "references": refs, "live": model.live_version},
        )
        return _version_value(model, row)

    def _check_free(self, s: Session, tenant_id: int, name: str, bases: set[str]) -> None:
        """``Conflict`` when ``name`` is one of the tenant's adapters or a base's name."""
        adapter = s.exec(
            select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
        ).first()
        if adapter is not None:
            raise Conflict(
                f"{name!r} is one of your adapters, so no routed model may take the name; "
                "pick another name for the routed model (it may reference the adapter)"
            )
        if name in bases:
            raise Conflict(
                f"{name!r} is the name of a registered base model, so no routed model may "
                "take it; pick another name for the routed model (it may reference the base)"
            )

    def _check_references(
        self, s: Session, tenant_id: int, refs: builtins.list[str], bases: set[str]
    ) -> None:
        """``InvalidRequest`` unless each reference is a base's served name or one of the
        tenant's adapters (never a routed model)."""
        unknown, routed = [], []
        for ref in refs:
            if ref in bases:
                continue
            found = _ADAPTER_REF.fullmatch(ref)
            if found is None:
                unknown.append(ref)
            elif routed_model_named(s, tenant_id, found["name"]) is not None:
                routed.append(ref)
            elif not self._own_reference(s, tenant_id, found["name"], found["version"]):
                unknown.append(ref)
        if routed:
            listed = ", ".join(repr(r) for r in routed)
            raise InvalidRequest(
                f"the policy references {listed}, your routed model(s); a routed model "
                "cannot route to another one: reference its adapters or bases instead"
            )
        if unknown:
            raise unknown_reference(unknown)

    def _own_reference(self, s: Session, tenant_id: int, name: str, version: str | None) -> bool:
        """Whether the tenant has adapter ``name`` (and its version ``version``, if given)."""
        query = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
        adapter = s.exec(query).first()
        if adapter is None or version is None:
            return adapter is not None
        numbered = select(AdapterVersion).where(
            AdapterVersion.adapter_id == adapter.id, AdapterVersion.number == int(version)
        )
        return s.exec(numbered).first() is not None

    def live(self, tenant_id: int, name: str) -> LiveRoutedModel | None:
        """The live version's policy, or None (unknown, foreign or deleted alike)."""
        with self._read() as s:
            model = routed_model_named(s, tenant_id, name)
            if model is None or model.live_version is None:
                return None
            row = self._version_row(s, model, model.live_version)
            return LiveRoutedModel(name, row.number, row.policy)

    def get(self, tenant_id: int, name: str) -> RoutedModelInfo:
        with self._read() as s:
            return self._info(s, self._model(s, tenant_id, name))

    def list(self, tenant_id: int) -> builtins.list[RoutedModelInfo]:
        """The tenant's routed models, by name."""
        with self._read() as s:
            rows = s.exec(
                select(RoutedModel)
                .where(RoutedModel.tenant_id == tenant_id, RoutedModel.tombstone == 0)
                .order_by(col(RoutedModel.name))
            ).all()
            return [self._info(s, row) for row in rows]

    def version(self, tenant_id: int, name: str, number: int) -> RoutedVersion:
        with self._read() as s:
            model = self._model(s, tenant_id, name)
            return _version_value(model, self._version_row(s, model, number))

    def versions(self, tenant_id: int, name: str) -> builtins.list[RoutedVersion]:
        """Every version, oldest first."""
        with self._read() as s:
            model = self._model(s, tenant_id, name)
            return [_version_value(model, row) for row in self._version_rows(s, model)]

    def set_gates(
        self, tenant_id: int, name: str, gates: Sequence[RoutingGate], actor: Actor
    ) -> builtins.list[RoutingGate]:
        """Replace the routed model's promotion gates (an empty list removes them); one
        gate per suite."""
        gates = list(gates)
        if not all(isinstance(g, RoutingGate) for g in gates):
            raise InvalidRequest("gates must be RoutingGate values")
        suites = [g.suite for g in gates]
        twice = sorted({suite for suite in suites if suites.count(suite) > 1})
        if twice:
            raise InvalidRequest(
                f"more than one gate on suite(s) {', '.join(twice)}; put both thresholds "
                "in one gate per suite"
            )
        with self._write() as s:
            model = self._model(s, tenant_id, name, lock=True)
            before = {"gates": list(model.gates)}
            model.gates = [asdict(g) for g in gates]
            s.add(model)
            self._audit(s, model, actor, GATES, before=before, after={"gates": model.gates})
        return gates

    def record_eval(
        self,
        tenant_id: int,
        name: str,
        number: int,
        accuracy: float,
        examples: int,
        confusion: dict[str, dict[str, int]],
        actor: Actor,
        suite: str = ROUTING_SUITE,
    ) -> RoutingEval:
        """Record how accurately version ``number`` routed ``examples`` labelled examples."""
        _check_eval(accuracy, examples, suite)
        _check_confusion(confusion, examples)
        with self._write() as s:
            model = self._model(s, tenant_id, name)
            version = self._version_row(s, model, number)
            assert version.id is not None
            row = RoutedModelEval(
                version_id=version.id,
                suite=suite,
                accuracy=float(accuracy),
                examples=examples,
                confusion=confusion,
                created_by=actor.name,
            )
            s.add(row)
            after = {"version": number, "suite": suite, "accuracy": row.accuracy,
                     "examples": examples}  # fmt: skip
            self._audit(s, model, actor, EVAL, number=number, after=after)
        return _eval_value(name, number, row)

    def evals(self, tenant_id: int, name: str) -> builtins.list[RoutingEval]:
        """Every version's routing evals, oldest first."""
        with self._read() as s:
            model = self._model(s, tenant_id, name)
            rows = s.exec(
                select(RoutedModelEval, RoutedModelVersion.number)
                .join(RoutedModelVersion, col(RoutedModelVersion.id) == RoutedModelEval.version_id)
                .where(RoutedModelVersion.routed_model_id == model.id)
                .order_by(col(RoutedModelEval.id))
            ).all()
            return [_eval_value(name, number, row) for row, number in rows]

    def promote(
        self, tenant_id: int, name: str, number: int, actor: Actor, override: bool = False
    ) -> RoutedVersion:
        """Make version ``number`` live; its gates must pass unless an admin overrides. A
        refusal by the gates is recorded (a public event) in a transaction of its own."""
        try:
            return self._promote(tenant_id, name, number, actor, override)
        except GateFailed as refused:
            with self._write() as s:
                model = self._model(s, tenant_id, name)
                after = {"version": number, "failed_gates": refused.failures}
                self._audit(s, model, actor, GATE_FAILED, number, after=after)
            raise

    def _promote(
        self, tenant_id: int, name: str, number: int, actor: Actor, override: bool
    ) -> RoutedVersion:
        with self._write() as s:
            model = self._model(s, tenant_id, name, lock=True)
            target = self._version_row(s, model, number)
            if model.live_version == number:
                raise Conflict(f"version {number} is already live; promote another version")
            failures, notes = self._gate_failures(s, model, target)
            if failures and not override:
                raise GateFailed(failures)
            if failures and not actor.admin:
                raise PermissionDenied("only admins may override promotion gates")
            extra: dict[str, Any] = {"gate_notes": notes} if notes else {}
            if failures:
                extra.update(override=True, failed_gates=failures)
            self._go_live(s, model, target, actor, PROMOTE, extra)
            return _version_value(model, target)

    def rollback(self, tenant_id: int, name: str, actor: Actor) -> RoutedVersion:
        """Make live again the version that was live before the latest promote not yet
        walked back; ``Conflict`` when there is none."""
        with self._write() as s:
            model = self._model(s, tenant_id, name, lock=True)
            entry = s.exec(
                select(RoutedModelHistory)
                .where(RoutedModelHistory.routed_model_id == model.id)
                .where(RoutedModelHistory.action == PROMOTE)
                .where(col(RoutedModelHistory.undone).is_(False))
                .order_by(col(RoutedModelHistory.id).desc())
            ).first()
            if entry is None or entry.previous_version_id is None:
                raise Conflict("there is no earlier live version to roll back to; promote one")
            target = s.get(RoutedModelVersion, entry.previous_version_id)
            assert target is not None
            entry.undone = True
            s.add(entry)
            self._go_live(s, model, target, actor, ROLLBACK, {})
            return _version_value(model, target)

    def delete(self, tenant_id: int, name: str, actor: Actor) -> None:
        """Delete the routed model: its name stops resolving and is free for reuse; its
        versions, evals and history stay (for audit)."""
        with self._write() as s:
            model = self._model(s, tenant_id, name, lock=True)
            assert model.id is not None
            live = model.live_version
            model.tombstone, model.deleted_at = model.id, utcnow()
            s.add(model)
            s.add(RoutedModelHistory(
                routed_model_id=model.id, action=DELETE, actor=actor.name,
                previous_version_id=self._version_row(s, model, live).id if live else None,
            ))  # fmt: skip
            self._audit(s, model, actor, DELETE, before={"live_version": live})

    # -- helpers -------------------------------------------------------------

    def _model(self, s: Session, tenant_id: int, name: str, lock: bool = False) -> RoutedModel:
        model = routed_model_named(s, tenant_id, name, lock)
        if model is None:
            raise unknown_routed_model(name)
        return model

    def _version_row(self, s: Session, model: RoutedModel, number: int) -> RoutedModelVersion:
        row = s.exec(
            select(RoutedModelVersion).where(
                RoutedModelVersion.routed_model_id == model.id, RoutedModelVersion.number == number
            )
        ).first()
        if row is None:
            raise NotFound(
                f"routed model {model.name!r} has no version {number}; list its versions"
            )
        return row

    def _version_rows(self, s: Session, model: RoutedModel) -> builtins.list[RoutedModelVersion]:
        query = select(RoutedModelVersion).where(RoutedModelVersion.routed_model_id == model.id)
        return list(s.exec(query.order_by(col(RoutedModelVersion.number))).all())

    def _info(self, s: Session, model: RoutedModel) -> RoutedModelInfo:
        count, latest = s.exec(
            select(func.count(), func.max(RoutedModelVersion.number)).where(
                RoutedModelVersion.routed_model_id == model.id
            )
        ).one()
        return RoutedModelInfo(
            model.name,
            model.live_version,
            latest or 0,
            count,
            [RoutingGate(**g) for g in model.gates],
            model.created_at,
        )

    def _audit(
        self,
        s: Session,
        model: RoutedModel,
        actor: Actor,
        action: str,
        number: int | None = None,
        before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
    ) -> None:
        tenant = self._tenant(s, model.tenant_id)
        subject = _subject(tenant.name, model.name) + (f"@{number}" if number else "")
        audit.record(
            s, actor.name, action, subject, tenant_id=model.tenant_id, before=before, after=after
        )

    def _go_live(
        self,
        s: Session,
        model: RoutedModel,
        target: RoutedModelVersion,
        actor: Actor,
        action: str,
        extra: dict[str, Any],
    ) -> None:
        """Point the routed model at ``target``, with its history row and audit event."""
        assert model.id is not None
        previous = model.live_version
        before = self._version_row(s, model, previous) if previous is not None else None
        model.live_version = target.number
        s.add(model)
        s.add(RoutedModelHistory(
            routed_model_id=model.id, action=action, version_id=target.id,
            previous_version_id=before.id if before else None, actor=actor.name,
        ))  # fmt: skip
        after = {"live_version": target.number, "version": target.number, **extra}
        self._audit(s, model, actor, action, before={"live_version": previous}, after=after)

    def _gate_failures(
        self, s: Session, model: RoutedModel, candidate: RoutedModelVersion
    ) -> tuple[builtins.list[str], builtins.list[str]]:
        """(every gate the candidate fails, notes on checks that passed for want of a
        live eval to compare with), in words naming the numbers."""
        failures: builtins.list[str] = []
        notes: builtins.list[str] = []
        live = model.live_version
        current = self._version_row(s, model, live) if live is not None else None
        for gate in (RoutingGate(**g) for g in model.gates):
            value = _latest_accuracy(s, candidate, gate.suite)
            if value is None:
                failures.append(
                    f"{gate.suite}: version {candidate.number} has no routing eval on suite "
                    f"{gate.suite!r}; record a routing eval first"
                )
                continue
            if gate.min_accuracy is not None and value < gate.min_accuracy - TOLERANCE:
                failures.append(
                    f"{gate.suite}: accuracy {value:g} misses the minimum {gate.min_accuracy:g}"
                )
            if gate.max_regression is None or current is None:
                continue
            baseline = _latest_accuracy(s, current, gate.suite)
            if baseline is None:
                notes.append(
                    f"{gate.suite}: live version {current.number} has no routing eval on the "
                    "suite; max_regression not checked"
                )
            elif value < baseline - gate.max_regression - TOLERANCE:
                failures.append(
                    f"{gate.suite}: accuracy {value:g} is below live version {current.number}'s "
                    f"{baseline:g} by more than the tolerance {gate.max_regression:g}"
                )
        return failures, notes


def _latest_accuracy(s: Session, version: RoutedModelVersion, suite: str) -> float | None:
    row = s.exec(
        select(RoutedModelEval)
        .where(RoutedModelEval.version_id == version.id, RoutedModelEval.suite == suite)
        .order_by(col(RoutedModelEval.id).desc())
    ).first()
    return None if row is None else row.accuracy


def _reference_list(references: Collection[str]) -> list[str]:
    """The references, each once, in their order; ``InvalidRequest`` for a bad list."""
    if isinstance(references, str) or not all(isinstance(r, str) for r in references):
        raise InvalidRequest("references must be a list of model names (strings)")
    refs = list(dict.fromkeys(references))
    if not refs:
        raise InvalidRequest(
            "the policy references no model; a routed model must route to at least one "
            "adapter or base"
        )
    if len(refs) > MAX_REFERENCES:
        raise InvalidRequest(
            f"the policy references {len(refs)} models, over the limit of {MAX_REFERENCES}"
        )
    return refs


def _subject(tenant: str, name: str) -> str:
    return f"routed_model:{tenant}/{name}"


def _version_value(model: RoutedModel, row: RoutedModelVersion) -> RoutedVersion:
    return RoutedVersion(
        model.name,
        row.number,
        row.policy,
        list(row.references),
        row.description,
        row.created_by,
        row.created_at,
        row.number == model.live_version,
    )


def _eval_value(name: str, number: int, row: RoutedModelEval) -> RoutingEval:
    return RoutingEval(
        name,
        number,
        row.suite,
        row.accuracy,
        row.examples,
        row.confusion,
        row.created_at,
        row.created_by,
    )
