"""Versioned datasets: ordered, content-addressed sets of fine-tuning examples.

A tenant's dataset has versions 1, 2, ...; each after the first has a parent and a diff
(the examples it added and removed). An example is one JSON object of the fine-tuning
file format (chat ``messages`` for supervised training; ``input``, ``preferred_output``
and ``non_preferred_output`` for DPO), addressed by the SHA-256 of its canonical JSON; a
version by the SHA-256 of its examples' addresses in order, so the same examples in the
same order are the same version. A version holds each example once.

A version's examples are also an ordinary fine-tuning file (``training_files``, written
in the same transaction), so any job can train on it; a job created on that file
records the version (``FineTuningJob.dataset_version_id``).

Every example remembers where it came from: an uploaded file, a stored completion, and
the end user (the request's ``user``) when known. Erasing a source (``erase``) deletes
the content of every example that came only from it, so no later version can hold it,
and answers the lineage: each dataset version that held it and each adapter version
trained on one of those. Earlier versions' files stay as they were (they are what those
adapter versions were trained on) until their owner deletes them; ``retrain_plan``
names, per affected dataset, the job to repeat on a version without the erased examples.

Everything is tenant-scoped: a foreign dataset answers exactly like an unknown one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import JSON, Text, UniqueConstraint, delete, func
from sqlmodel import Field, Session, SQLModel, col, select

from registry import audit
from registry.adapter_names import check_adapter_name
from registry.captures import CaptureStore
from registry.dataset_sources import CompletionFilter, Method, check_filter, made_from
from registry.errors import Conflict, InvalidRequest, NotFound
from registry.jobs import FineTuningJob, JobStore, TrainingFile
from registry.models import Adapter, AdapterVersion, timestamp_column, utcnow
from registry.store import Store
from registry.values import Actor

SourceKind = Literal["file", "completion"]
MAX_EXAMPLES = 1_000_000
"""Most examples one version may hold (a bound on one transaction's size)."""


class Dataset(SQLModel, table=True):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenants.id", index=True)
    name: str = Field(max_length=128)
    description: str = Field(default="", max_length=4096)
    created_at: dt.datetime = timestamp_column()


class DatasetExample(SQLModel, table=True):
    __tablename__ = "dataset_examples"
    __table_args__ = (UniqueConstraint("tenant_id", "sha256"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenants.id", index=True)
    sha256: str = Field(max_length=64)
    content: str | None = Field(default=None, sa_type=Text)
    """The example's canonical JSON; None once erased."""
    erased_at: dt.datetime | None = timestamp_column(nullable=True)


class ExampleSource(SQLModel, table=True):
    """Where an example came from; one example may have come from several places."""

    __tablename__ = "dataset_example_sources"
    __table_args__ = (UniqueConstraint("example_id", "kind", "ref"),)

    id: int | None = Field(default=None, primary_key=True)
    example_id: int = Field(foreign_key="dataset_examples.id", index=True)
    kind: str = Field(max_length=16)
    """``file`` (``ref``: its id) or ``completion`` (``ref``: the completion's id)."""
    ref: str = Field(max_length=256, index=True)
    user: str | None = Field(default=None, max_length=256, index=True)
    """The end user the request named (``user``), when there was one."""


class DatasetVersion(SQLModel, table=True):
    __tablename__ = "dataset_versions"
    __table_args__ = (UniqueConstraint("dataset_id", "number"),)

    id: int | None = Field(default=None, primary_key=True)
    dataset_id: int = Field(foreign_key="datasets.id", index=True)
    number: int
    parent_id: int | None = Field(default=None, foreign_key="dataset_versions.id")
    sha256: str = Field(max_length=64)
    method: str = Field(max_length=16)
    example_count: int
    added: int
    removed: int
    file_id: str = Field(foreign_key="training_files.id", max_length=40, index=True)
    """The version's examples as a fine-tuning file (JSON lines, in order)."""
    source: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    """How it was built: the file, the completions filter, what was removed."""
    audit: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    """The data audit's report on it (duplicates, leakage, lengths), when one ran."""
    created_by: str = Field(default="", max_length=256)
    created_at: dt.datetime = timestamp_column()


class VersionMember(SQLModel, table=True):
    __tablename__ = "dataset_version_examples"

    version_id: int = Field(foreign_key="dataset_versions.id", primary_key=True)
    position: int = Field(primary_key=True)
    example_id: int = Field(foreign_key="dataset_examples.id", index=True)


@dataclass(frozen=True)
class NewExample:
    """One example to add, with where it came from."""

    content: dict[str, Any]
    kind: SourceKind
    ref: str
    user: str | None = None


@dataclass(frozen=True)
class VersionChange:
    """What a new version changes from the latest one."""

    add: Sequence[NewExample] = ()
    remove: Sequence[str] = ()
    """Addresses (SHA-256) of the latest version's examples to leave out."""
    replace: bool = False
    """Start from no examples instead of the latest version's."""
    method: Method = "supervised"
    source: dict[str, Any] = field(default_factory=dict)
    """How the change was made, recorded on the version."""


@dataclass(frozen=True)
class Diff:
    """A version's examples against its parent's, by address."""

    added: list[str]
    removed: list[str]


@dataclass(frozen=True)
class Lineage:
    """What an erased source had reached: dataset versions, and adapter versions trained on them."""

    examples: int
    """Examples reached (by ``erase``: those whose content it deleted, having come from
    nowhere else)."""
    dataset_versions: list[tuple[str, int]]
    """(dataset, version number) pairs that held one of them."""
    adapter_versions: list[tuple[str, int, str]]
    """(adapter, version number, training job id) trained on one of those versions."""

    def to_json(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "dataset_versions": [{"dataset": d, "version": n} for d, n in self.dataset_versions],
            "adapter_versions": [
                {"adapter": a, "version": n, "training_job": j} for a, n, j in self.adapter_versions
            ],
        }


def canonical(example: dict[str, Any]) -> str:
    """The example's canonical JSON: what its address is the hash of."""
    return json.dumps(example, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def address(example: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(example).encode()).hexdigest()


def version_address(addresses: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(addresses).encode()).hexdigest()


def check_dataset_name(name: str) -> str:
    """Dataset names follow adapter names' rules (so an adapter's dataset can share its name)."""
    try:
        check_adapter_name(name)
    except InvalidRequest as exc:
        raise InvalidRequest(str(exc).replace("adapter", "dataset")) from None
    return name


def _dataset_not_found(name: str) -> NotFound:
    return NotFound(f"dataset {name!r} does not exist; list your datasets to see their names")


class DatasetStore(Store):
    """Datasets, their versions and their examples' lineage, on the registry's database."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs
        self.database, self.blobs, self.limits = jobs.database, jobs.blobs, jobs.limits

    # -- datasets ----------------------------------------------------------------------

    def create(self, tenant_id: int, name: str, description: str = "") -> Dataset:
        check_dataset_name(name)
        with self._read() as s:
            self._tenant(s, tenant_id)
        try:
            with self._write() as s:
                row = Dataset(tenant_id=tenant_id, name=name, description=description[:4096])
                s.add(row)
        except Exception as exc:
            if self._exists(tenant_id, name):
                raise Conflict(f"dataset {name!r} already exists; add a version to it") from exc
            raise
        return row

    def get(self, tenant_id: int, name: str) -> Dataset:
        with self._read() as s:
            return self._dataset(s, tenant_id, name)

    def list_datasets(self, tenant_id: int) -> list[Dataset]:
        with self._read() as s:
            query = select(Dataset).where(Dataset.tenant_id == tenant_id)
            return list(s.exec(query.order_by(col(Dataset.name))).all())

    def _exists(self, tenant_id: int, name: str) -> bool:
        with self._read() as s:
            query = select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.name == name)
            return s.exec(query).first() is not None

    def _dataset(self, s: Session, tenant_id: int, name: str, lock: bool = False) -> Dataset:
        query = select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.name == name)
        row = s.exec(query.with_for_update() if lock else query).first()
        if row is None:
            raise _dataset_not_found(name)
        return row

    # -- versions ----------------------------------------------------------------------

    def add_version(
        self, tenant_id: int, name: str, change: VersionChange, actor: Actor
    ) -> tuple[DatasetVersion, bool]:
        """The version ``change`` makes of the latest one, and whether it is new.

        The same examples in the same order as the latest version make no new version
        (the latest is answered). Erased examples never carry over. One transaction:
        the version, its members, its examples, their sources and its file.
        """
        return self._retrying(lambda: self._add_version(tenant_id, name, change, actor))

    def _add_version(
        self, tenant_id: int, name: str, change: VersionChange, actor: Actor
    ) -> tuple[DatasetVersion, bool]:
        with self._write() as s:
            dataset = self._dataset(s, tenant_id, name, lock=True)
            parent = self._latest(s, dataset)
            if parent is not None and parent.method != change.method and not change.replace:
                raise InvalidRequest(
                    f"dataset {name!r} holds {parent.method} examples; add {parent.method} "
                    f"examples to it, or replace its content to make it a {change.method} dataset"
                )
            kept = [] if parent is None or change.replace else self._live_members(s, parent)
            dropped = set(change.remove)
            unknown = dropped - {sha for sha, _ in kept}
            if unknown:
                raise InvalidRequest(
                    f"{len(unknown)} example(s) to remove are not in the latest version of "
                    f"{name!r} (e.g. {sorted(unknown)[0]}); list its examples for their addresses"
                )
            members = [(sha, text) for sha, text in kept if sha not in dropped]
            members += self._new_members(members, change.add)
            if len(members) > MAX_EXAMPLES:
                raise InvalidRequest(f"a version holds at most {MAX_EXAMPLES:,} examples")
            sha = version_address(m[0] for m in members)
            if parent is not None and parent.sha256 == sha:
                # No new version, but the sources are recorded: an erasure of another
                # source must know these examples came from this one too.
                self._example_ids(s, tenant_id, members, change.add)
                return parent, False
            version = self._insert(s, dataset, parent, members, change, actor)
            audit.record(
                s, actor.name, "dataset.version", f"{name}@{version.number}",
                tenant_id=tenant_id, after={"examples": version.example_count},
            )  # fmt: skip
        return version, True

    def add_from_completions(
        self, tenant_id: int, name: str, wanted: CompletionFilter, actor: Actor
    ) -> tuple[DatasetVersion, bool]:
        """A version adding the examples the filter's completions and feedback make
        (``dataset_sources``); each example remembers its completions and their users."""
        check_filter(wanted)
        made, read = made_from(CaptureStore(self.jobs.registry), tenant_id, wanted)
        add = [
            NewExample(m.content, "completion", row.completion_id, row.user)
            for m in made
            for row in m.completions
        ]
        source = {"completions": wanted.to_json(), "read": read, "made": len(made)}
        change = VersionChange(add=add, method=wanted.method, source=source)
        return self.add_version(tenant_id, name, change, actor)

    @staticmethod
    def _new_members(
        members: list[tuple[str, str]], added: Sequence[NewExample]
    ) -> list[tuple[str, str]]:
        present = {sha for sha, _ in members}
        new: list[tuple[str, str]] = []
        for example in added:
            text = canonical(example.content)
            sha = hashlib.sha256(text.encode()).hexdigest()
            if sha not in present:
                present.add(sha)
                new.append((sha, text))
        return new

    def _insert(
        self,
        s: Session,
        dataset: Dataset,
        parent: DatasetVersion | None,
        members: list[tuple[str, str]],
        change: VersionChange,
        actor: Actor,
    ) -> DatasetVersion:
        before = set() if parent is None else {sha for sha, _ in self._members(s, parent)}
        after = {sha for sha, _ in members}
        content = "".join(text + "\n" for _, text in members).encode()
        number = 1 if parent is None else parent.number + 1
        record = self.jobs.stage_file(dataset.tenant_id, f"{dataset.name}-v{number}.jsonl", content)
        s.add(record)
        s.flush()  # before the version that names it (no relationship orders the inserts)
        ids = self._example_ids(s, dataset.tenant_id, members, change.add)
        version = DatasetVersion(
            dataset_id=dataset.id,  # type: ignore[arg-type]
            number=number,
            parent_id=None if parent is None else parent.id,
            sha256=version_address(sha for sha, _ in members),
            method=change.method,
            example_count=len(members),
            added=len(after - before),
            removed=len(before - after),
            file_id=record.id,
            source=change.source,
            created_by=actor.name,
        )
        s.add(version)
        s.flush()
        s.add_all(
            VersionMember(version_id=version.id, position=i, example_id=ids[sha])  # type: ignore[arg-type]
            for i, (sha, _) in enumerate(members)
        )
        return version

    def _example_ids(
        self,
        s: Session,
        tenant_id: int,
        members: list[tuple[str, str]],
        added: Sequence[NewExample],
    ) -> dict[str, int]:
        """Ids of the members' examples, inserting new ones and their new sources."""
        shas = [sha for sha, _ in members]
        texts = dict(members)
        ids: dict[str, int] = {}
        for chunk in _chunks(shas, 500):
            query = select(DatasetExample.sha256, DatasetExample.id, DatasetExample.content).where(
                DatasetExample.tenant_id == tenant_id, col(DatasetExample.sha256).in_(chunk)
            )
            for sha, example_id, content in s.exec(query).all():
                assert example_id is not None
                ids[sha] = example_id
                if content is None:  # erased, then added again from a live source
                    s.get_one(DatasetExample, example_id).content = texts[sha]
        for sha, text in members:
            if sha not in ids:
                row = DatasetExample(tenant_id=tenant_id, sha256=sha, content=text)
                s.add(row)
                s.flush()
                ids[sha] = row.id  # type: ignore[assignment]
        self._add_sources(s, ids, added)
        return ids

    @staticmethod
    def _add_sources(s: Session, ids: dict[str, int], added: Sequence[NewExample]) -> None:
        known = {
            (row.example_id, row.kind, row.ref)
            for chunk in _chunks(list(ids.values()), 500)
            for row in s.exec(
                select(ExampleSource).where(col(ExampleSource.example_id).in_(chunk))
            ).all()
        }
        for example in added:
            key = (ids[address(example.content)], example.kind, example.ref)
            if key not in known:
                known.add(key)
                s.add(ExampleSource(example_id=key[0], kind=key[1], ref=key[2], user=example.user))

    def versions(self, tenant_id: int, name: str) -> list[DatasetVersion]:
        with self._read() as s:
            dataset = self._dataset(s, tenant_id, name)
            query = select(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id)
            return list(s.exec(query.order_by(col(DatasetVersion.number))).all())

    def get_version(self, tenant_id: int, name: str, number: int | None = None) -> DatasetVersion:
        """Version ``number`` of the dataset, or its latest when None."""
        with self._read() as s:
            dataset = self._dataset(s, tenant_id, name)
            version = (
                self._latest(s, dataset)
                if number is None
                else s.exec(
                    select(DatasetVersion).where(
                        DatasetVersion.dataset_id == dataset.id, DatasetVersion.number == number
                    )
                ).first()
            )
        if version is None:
            which = "has no versions yet" if number is None else f"has no version {number}"
            raise NotFound(f"dataset {name!r} {which}; list its versions to see them")
        return version

    def set_audit(self, version: DatasetVersion, report: dict[str, Any]) -> None:
        """Record the data audit's report on ``version``."""
        with self._write() as s:
            row = s.get_one(DatasetVersion, version.id)
            row.audit = report
            s.add(row)
        version.audit = report

    def examples(self, version: DatasetVersion) -> list[tuple[str, dict[str, Any] | None]]:
        """The version's examples in order: (address, content; None where erased)."""
        with self._read() as s:
            return [
                (sha, None if text is None else json.loads(text))
                for sha, text in self._members(s, version)
            ]

    def diff(self, version: DatasetVersion) -> Diff:
        with self._read() as s:
            after = [sha for sha, _ in self._members(s, version)]
            parent = None if version.parent_id is None else s.get(DatasetVersion, version.parent_id)
            before = [] if parent is None else [sha for sha, _ in self._members(s, parent)]
        was, now = set(before), set(after)
        return Diff([a for a in after if a not in was], [b for b in before if b not in now])

    def version_of_file(self, tenant_id: int, file_id: str) -> DatasetVersion | None:
        """The dataset version whose file ``file_id`` is, if it is one."""
        with self._read() as s:
            query = (
                select(DatasetVersion)
                .join(Dataset, col(Dataset.id) == DatasetVersion.dataset_id)
                .where(DatasetVersion.file_id == file_id, Dataset.tenant_id == tenant_id)
            )
            return s.exec(query).first()

    def name_of(self, version: DatasetVersion) -> str:
        with self._read() as s:
            return s.get_one(Dataset, version.dataset_id).name

    def _latest(self, s: Session, dataset: Dataset) -> DatasetVersion | None:
        query = select(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id)
        return s.exec(query.order_by(col(DatasetVersion.number).desc())).first()

    @staticmethod
    def _members(s: Session, version: DatasetVersion) -> list[tuple[str, str | None]]:
        query = (
            select(DatasetExample.sha256, DatasetExample.content)
            .join(VersionMember, col(VersionMember.example_id) == DatasetExample.id)
            .where(VersionMember.version_id == version.id)
            .order_by(col(VersionMember.position))
        )
        return [(sha, text) for sha, text in s.exec(query).all()]

    def _live_members(self, s: Session, version: DatasetVersion) -> list[tuple[str, str]]:
        return [(sha, text) for sha, text in self._members(s, version) if text is not None]

    # -- erasure and lineage -----------------------------------------------------------

    def erase(
        self,
        tenant_id: int,
        actor: Actor,
        *,
        file_id: str | None = None,
        completion_ids: Sequence[str] = (),
        user: str | None = None,
    ) -> Lineage:
        """Delete the content of every example that came only from the given sources.

        An example also added from a source not being erased keeps its content (it is
        still that source's data). Answers what the erased examples had reached.
        """
        with self._write() as s:
            reached = self._sourced(s, tenant_id, file_id, completion_ids, user)
            doomed = self._only_from(s, reached)
            now = utcnow()
            for chunk in _chunks(doomed, 500):
                for row in s.exec(
                    select(DatasetExample).where(col(DatasetExample.id).in_(chunk))
                ).all():
                    row.content, row.erased_at = None, now
                    s.add(row)
            lineage = self._lineage(s, tenant_id, doomed)
            # The erased sources are gone: an example they shared with another source is
            # that one's alone now, and goes when it is erased in turn.
            erased = [source for sources in reached.values() for source in sources]
            for chunk in _chunks(erased, 500):
                s.execute(delete(ExampleSource).where(col(ExampleSource.id).in_(chunk)))
            subject = file_id or (f"user:{user}" if user else ",".join(completion_ids)[:256])
            audit.record(
                s, actor.name, "dataset.erase", subject, tenant_id=tenant_id,
                after={"examples": len(doomed), **lineage.to_json()},
            )  # fmt: skip
        return Lineage(len(doomed), lineage.dataset_versions, lineage.adapter_versions)

    def lineage(
        self,
        tenant_id: int,
        *,
        file_id: str | None = None,
        completion_ids: Sequence[str] = (),
        user: str | None = None,
    ) -> Lineage:
        """What erasing the given sources would reach, without erasing anything."""
        with self._read() as s:
            reached = self._sourced(s, tenant_id, file_id, completion_ids, user)
            return self._lineage(s, tenant_id, self._only_from(s, reached))

    def _only_from(self, s: Session, reached: dict[int, set[int]]) -> list[int]:
        """Of the examples ``reached`` (example id -> its matching sources), those that came
        from no other source.

        Lineage follows these only: an example that also came from elsewhere is that
        source's data too, and stays.
        """
        return [i for i in reached if not self._has_other_sources(s, i, reached[i])]

    @staticmethod
    def _sourced(
        s: Session,
        tenant_id: int,
        file_id: str | None,
        completion_ids: Sequence[str],
        user: str | None,
    ) -> dict[int, set[int]]:
        """The tenant's examples from those sources: example id -> the matching source ids."""
        conditions: list[Any] = []
        if file_id is not None:
            conditions.append((col(ExampleSource.kind) == "file") & (ExampleSource.ref == file_id))
        if completion_ids:
            conditions.append(
                (col(ExampleSource.kind) == "completion")
                & col(ExampleSource.ref).in_(list(completion_ids))
            )
        if user is not None:
            conditions.append(col(ExampleSource.user) == user)
        if not conditions:
            raise InvalidRequest("name a file, stored completions or a user to erase")
        condition = conditions[0]
        for more in conditions[1:]:
            condition = condition | more
        query = (
            select(ExampleSource.example_id, ExampleSource.id)
            .join(DatasetExample, col(DatasetExample.id) == ExampleSource.example_id)
            .where(DatasetExample.tenant_id == tenant_id, condition)
        )
        found: dict[int, set[int]] = {}
        for example_id, source_id in s.exec(query).all():
            found.setdefault(example_id, set()).add(source_id)  # type: ignore[arg-type]
        return found

    @staticmethod
    def _has_other_sources(s: Session, example_id: int, erased: set[int]) -> bool:
        query = select(func.count()).where(
            ExampleSource.example_id == example_id, col(ExampleSource.id).not_in(erased)
        )
        return bool(s.exec(query).one())

    @staticmethod
    def _lineage(s: Session, tenant_id: int, example_ids: list[int]) -> Lineage:
        held: set[tuple[int, str, int]] = set()
        for chunk in _chunks(example_ids, 500):
            query = (
                select(DatasetVersion.id, Dataset.name, DatasetVersion.number)
                .join(VersionMember, col(VersionMember.version_id) == DatasetVersion.id)
                .join(Dataset, col(Dataset.id) == DatasetVersion.dataset_id)
                .where(col(VersionMember.example_id).in_(chunk), Dataset.tenant_id == tenant_id)
            )
            held.update((i, n, v) for i, n, v in s.exec(query).all() if i is not None)
        trained: set[tuple[str, int, str]] = set()
        for chunk in _chunks([i for i, _, _ in held], 500):
            jobs = (
                select(Adapter.name, AdapterVersion.number, FineTuningJob.id)
                .join(AdapterVersion, col(AdapterVersion.training_job) == FineTuningJob.id)
                .join(Adapter, col(Adapter.id) == AdapterVersion.adapter_id)
                .where(
                    col(FineTuningJob.dataset_version_id).in_(chunk),
                    FineTuningJob.tenant_id == tenant_id,
                    Adapter.tenant_id == tenant_id,
                )
            )
            trained.update((a, n, j) for a, n, j in s.exec(jobs).all())
        return Lineage(len(example_ids), sorted((n, v) for _, n, v in held), sorted(trained))

    # -- retraining ---------------------------------------------------------------------

    def last_job(self, tenant_id: int, version: DatasetVersion) -> FineTuningJob | None:
        """The newest job trained on any version of ``version``'s dataset."""
        with self._read() as s:
            query = (
                select(FineTuningJob)
                .join(DatasetVersion, col(DatasetVersion.id) == FineTuningJob.dataset_version_id)
                .where(
                    DatasetVersion.dataset_id == version.dataset_id,
                    FineTuningJob.tenant_id == tenant_id,
                )
                .order_by(col(FineTuningJob.created_at).desc())
            )
            return s.exec(query).first()


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


__all__ = [
    "CompletionFilter",
    "Dataset",
    "DatasetExample",
    "DatasetStore",
    "DatasetVersion",
    "Diff",
    "ExampleSource",
    "Lineage",
    "NewExample",
    "TrainingFile",
    "VersionChange",
    "VersionMember",
]
