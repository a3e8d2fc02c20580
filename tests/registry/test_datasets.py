"""Versioned datasets (``registry.datasets.DatasetStore``) on SQLite + local blobs and on
PostgreSQL + S3: versions and their diffs, content addresses, refusals that write
nothing, concurrent versions, erasure and lineage."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN
from sqlmodel import Session, SQLModel

from registry import (
    AdapterVersion,
    BaseModelRecord,
    InvalidRequest,
    LocalBlobStore,
    NotFound,
    Registry,
    Tenant,
)
from registry.datasets import (
    DatasetStore,
    DatasetVersion,
    NewExample,
    VersionChange,
    address,
)
from registry.jobs import FineTuningJob, JobStore, new_id


def chat(question: str, answer: str = "ok") -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


A, B, C, D = (chat(q) for q in ("a?", "b?", "c?", "d?"))


def from_file(file_id: str, *examples: dict[str, Any]) -> list[NewExample]:
    return [NewExample(e, "file", file_id) for e in examples]


def add(
    store: DatasetStore, tenant_id: int, *examples: dict[str, Any], ref: str = "file-1", **kw: Any
) -> tuple[DatasetVersion, bool]:
    change = VersionChange(add=from_file(ref, *examples), **kw)
    return store.add_version(tenant_id, "faq", change, ADMIN)


@pytest.fixture
def store(registry: Registry) -> DatasetStore:
    return DatasetStore(JobStore(registry))


@pytest.fixture
def faq(store: DatasetStore, tenant: Tenant) -> int:
    assert tenant.id is not None
    store.create(tenant.id, "faq", "questions")
    return tenant.id


def file_lines(store: DatasetStore, tenant_id: int, version: DatasetVersion) -> list[Any]:
    record = store.jobs.get_file(tenant_id, version.file_id)
    return [json.loads(line) for line in store.jobs.file_content(record).decode().splitlines()]


def test_versions_have_parents_diffs_and_files(store: DatasetStore, faq: int) -> None:
    v1, new1 = add(store, faq, A, B)
    v2, new2 = add(store, faq, C, remove=[address(A)])
    assert (new1, new2) == (True, True)
    assert (v1.number, v1.parent_id, v1.example_count, v1.added, v1.removed) == (1, None, 2, 2, 0)
    assert (v2.number, v2.parent_id, v2.example_count, v2.added, v2.removed) == (
        2, v1.id, 2, 1, 1
    )  # fmt: skip
    diff = store.diff(v2)
    assert (diff.added, diff.removed) == ([address(C)], [address(A)])
    assert store.diff(v1).added == [address(A), address(B)]
    assert [sha for sha, _ in store.examples(v2)] == [address(B), address(C)]
    assert file_lines(store, faq, v2) == [B, C]  # the version's file is its examples, in order
    assert [v.number for v in store.versions(faq, "faq")] == [1, 2]
    assert store.get_version(faq, "faq").number == 2
    assert store.get_version(faq, "faq", 1).sha256 == v1.sha256
    found = store.version_of_file(faq, v2.file_id)
    assert found is not None and found.id == v2.id


def test_identical_content_makes_no_new_version(store: DatasetStore, faq: int) -> None:
    v1, _ = add(store, faq, A, B)
    files = len(store.jobs.list_files(faq))
    again, new = add(store, faq, B, A)  # already there: nothing added, order unchanged
    assert (again.id, new) == (v1.id, False)
    assert [v.number for v in store.versions(faq, "faq")] == [1]
    assert len(store.jobs.list_files(faq)) == files


def test_order_matters_for_the_address(store: DatasetStore, faq: int) -> None:
    v1, _ = add(store, faq, A, B)
    v2, new = add(store, faq, B, A, replace=True)
    assert new and v2.number == 2 and v2.sha256 != v1.sha256
    assert (v2.added, v2.removed) == (0, 0)
    assert [sha for sha, _ in store.examples(v2)] == [address(B), address(A)]


def test_removing_an_unknown_example_is_refused_and_writes_nothing(
    store: DatasetStore, faq: int
) -> None:
    add(store, faq, A)
    files = len(store.jobs.list_files(faq))
    with pytest.raises(InvalidRequest, match="not in the latest version") as refused:
        add(store, faq, B, remove=[address(C)])
    assert address(C) in str(refused.value)
    assert [v.number for v in store.versions(faq, "faq")] == [1]
    assert len(store.jobs.list_files(faq)) == files
    assert store.lineage(faq, file_id="file-1").examples == 1  # B was not stored either


def test_names_are_checked_and_unique_per_tenant(
    store: DatasetStore, faq: int, registry: Registry
) -> None:
    from registry import Conflict

    with pytest.raises(Conflict, match="already exists"):
        store.create(faq, "faq")
    with pytest.raises(InvalidRequest, match="dataset"):
        store.create(faq, "no spaces allowed")
    other = registry.create_tenant("globex", ADMIN).id
    assert other is not None
    store.create(other, "faq")  # another tenant's namespace
    assert [d.name for d in store.list_datasets(other)] == ["faq"]


def test_a_foreign_dataset_answers_like_an_unknown_one(
    store: DatasetStore, faq: int, registry: Registry
) -> None:
    add(store, faq, A)
    other = registry.create_tenant("globex", ADMIN).id
    assert other is not None
    messages = []
    for name in ("faq", "nope"):
        with pytest.raises(NotFound) as missing:
            store.get_version(other, name)
        messages.append(str(missing.value).replace(repr(name), "NAME"))
    assert messages[0] == messages[1]
    with pytest.raises(NotFound):
        add_to = VersionChange(add=from_file("file-9", B))
        store.add_version(other, "faq", add_to, ADMIN)


def test_erasure_deletes_content_only_from_the_erased_source(store: DatasetStore, faq: int) -> None:
    v1, _ = add(store, faq, A, B, ref="file-a")
    add(store, faq, C, B, ref="file-b")  # B also came from file-b: it is file-b's data too
    lineage = store.erase(faq, ADMIN, file_id="file-a")
    assert lineage.examples == 1  # A only
    assert lineage.dataset_versions == [("faq", 1), ("faq", 2)]
    assert dict(store.examples(v1)) == {address(A): None, address(B): B}
    v3, new = add(store, faq, D, ref="file-c")
    assert new and [sha for sha, _ in store.examples(v3)] == [address(B), address(C), address(D)]
    assert file_lines(store, faq, v3) == [B, C, D]  # the erased example is in no later file
    assert store.lineage(faq, file_id="file-c").examples == 1  # what erasing it would reach


def test_erasing_every_source_of_an_example_erases_it(store: DatasetStore, faq: int) -> None:
    """file-a's source rows must not keep B alive once file-a is erased too."""
    v1, _ = add(store, faq, A, B, ref="file-a")
    add(store, faq, C, B, ref="file-b")
    assert store.erase(faq, ADMIN, file_id="file-a").examples == 1  # A; B is file-b's too
    assert store.lineage(faq, file_id="file-b").examples == 2  # B and C now
    assert store.erase(faq, ADMIN, file_id="file-b").examples == 2
    assert dict(store.examples(v1)) == {address(A): None, address(B): None}


def test_a_source_adding_only_known_examples_is_still_recorded(
    store: DatasetStore, faq: int
) -> None:
    """No new version, but file-b did hold B: erasing file-a must leave B's content."""
    v1, _ = add(store, faq, A, B, ref="file-a")
    again, new = add(store, faq, B, ref="file-b")
    assert (again.id, new) == (v1.id, False)
    store.erase(faq, ADMIN, file_id="file-a")
    assert dict(store.examples(v1)) == {address(A): None, address(B): B}


def test_erasure_by_user_and_lineage_to_adapter_versions(
    store: DatasetStore,
    faq: int,
    base: BaseModelRecord,
    bot_v1: AdapterVersion,
    registry: Registry,
) -> None:
    said = [NewExample(A, "completion", "chatcmpl-1", "u-1"), NewExample(B, "completion", "c2")]
    version, _ = store.add_version(faq, "faq", VersionChange(add=said), ADMIN)
    job = FineTuningJob(
        id=new_id("ftjob"),
        tenant_id=faq,
        model=base.name,
        base_fingerprint=base.fingerprint,
        training_file=version.file_id,
        adapter_name="bot",
        dataset_version_id=version.id,
    )
    store.jobs.create_job(job)
    with Session(registry.database) as s:  # as the worker registers the job's result
        row = s.get_one(AdapterVersion, bot_v1.id)
        row.training_job = job.id
        s.add(row)
        s.commit()
    reached = store.lineage(faq, user="u-1")
    assert reached.dataset_versions == [("faq", 1)]
    assert reached.adapter_versions == [("bot", 1, job.id)]
    erased = store.erase(faq, ADMIN, user="u-1")
    assert erased.examples == 1 and erased.adapter_versions == [("bot", 1, job.id)]
    assert dict(store.examples(version))[address(A)] is None
    assert dict(store.examples(version))[address(B)] == B


def test_erase_needs_a_source(store: DatasetStore, faq: int) -> None:
    with pytest.raises(InvalidRequest, match="name a file"):
        store.erase(faq, ADMIN)


@pytest.fixture
def pg_store(pg_registry: Registry, pg_url: str, tmp_path: Path) -> Iterator[DatasetStore]:
    """PostgreSQL alone: SQLite serializes writers, so only there do versions race."""
    with pg_registry.database.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())
    registry = Registry(pg_url, LocalBlobStore(tmp_path / "blobs"))
    yield DatasetStore(JobStore(registry))
    registry.close()


def test_concurrent_versions_on_postgresql_get_distinct_numbers(pg_store: DatasetStore) -> None:
    tenant_id = pg_store.jobs.registry.create_tenant("acme", ADMIN).id
    assert tenant_id is not None
    pg_store.create(tenant_id, "faq")
    numbers: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def one(i: int) -> None:
        start.wait()
        try:
            version, _ = add(pg_store, tenant_id, chat(f"q{i}?"), ref=f"file-{i}")
            numbers.append(version.number)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(numbers) == [1, 2, 3, 4, 5, 6]
    latest = pg_store.get_version(tenant_id, "faq")
    assert latest.example_count == 6  # each version kept every earlier one's examples
