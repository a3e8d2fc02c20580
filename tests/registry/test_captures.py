"""Stored chat completions and feedback (registry.captures), on SQLite + local blobs and on
PostgreSQL + S3: settings, inline and blob bodies, filters and pages, tenant isolation,
deletion and retention."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from conftest import ADMIN

from registry import InvalidRequest, NotFound, Registry, Tenant
from registry.captures import (
    CaptureSettings,
    CaptureStore,
    CompletionQuery,
    FeedbackInput,
    FeedbackQuery,
    NewCompletion,
    metadata_problem,
)
from registry.models import utcnow

INLINE = 600
"""The store's inline threshold here: small, so the tests reach the blob store too."""
T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def store(registry: Registry) -> CaptureStore:
    return CaptureStore(registry, inline_bytes=INLINE)


@pytest.fixture
def other(registry: Registry) -> Tenant:
    return registry.create_tenant("globex", ADMIN)


def _id(tenant: Tenant) -> int:
    assert tenant.id is not None
    return tenant.id


def completion(
    tenant: Tenant, number: int, *, text: str = "hi", minutes: int = 0, **fields: Any
) -> NewCompletion:
    """A captured completion ``chatcmpl-<number>``; ``fields`` override the record's."""
    completion_id = f"chatcmpl-{number}"
    values: dict[str, Any] = {
        "tenant_id": _id(tenant),
        "completion_id": completion_id,
        "model": "bot",
        "adapter": "bot",
        "version": 1,
        "route": "production",
        "user": "u1",
        "metadata": {},
        "stream": False,
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "created_at": T0 + dt.timedelta(minutes=minutes),
        "request": {"model": "bot", "messages": [{"role": "user", "content": text}]},
        "response": {
            "id": completion_id,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "yo"}}],
        },
    }
    return NewCompletion(**{**values, **fields})


def _ids(found: list[Any]) -> list[str]:
    return [c.completion_id for c in found]


def test_capture_is_off_until_set_and_every_change_is_audited(
    registry: Registry, store: CaptureStore, tenant: Tenant
) -> None:
    assert store.settings(_id(tenant)) == CaptureSettings()
    assert not CaptureSettings().enabled
    on = CaptureSettings(enabled=True, store_by_default=True, retention_days=7, max_body_bytes=99)
    assert store.set_settings("acme", on, ADMIN) == ("acme", on)
    assert store.settings(_id(tenant)) == on
    store.set_settings(_id(tenant), CaptureSettings(), ADMIN)
    assert store.settings(_id(tenant)) == CaptureSettings()
    first, second = registry.audit_log(action="tenant.capture")
    assert first.before is None and first.after is not None
    assert first.after["retention_days"] == 7
    assert second.before is not None and second.before["enabled"] is True
    assert second.subject == "tenant:acme" and second.tenant_id == tenant.id


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        (CaptureSettings(retention_days=0), "retention_days must be from 1 to 3650"),
        (CaptureSettings(retention_days=3651), "retention_days must be from 1 to 3650"),
        (CaptureSettings(max_body_bytes=0), "max_body_bytes must be from 1 to"),
    ],
)
def test_settings_out_of_range_are_refused(
    store: CaptureStore, tenant: Tenant, settings: CaptureSettings, problem: str
) -> None:
    with pytest.raises(InvalidRequest, match=problem):
        store.set_settings(_id(tenant), settings, ADMIN)
    assert store.settings(_id(tenant)) == CaptureSettings()


def test_settings_of_an_unknown_tenant_are_not_found(store: CaptureStore) -> None:
    with pytest.raises(NotFound, match="tenant 'ghost' does not exist"):
        store.set_settings("ghost", CaptureSettings(enabled=True), ADMIN)


def test_small_bodies_stay_inline_and_large_ones_go_to_the_blob_store(
    registry: Registry, store: CaptureStore, tenant: Tenant
) -> None:
    big = "x" * (INLINE * 2)
    assert store.save([completion(tenant, 1), completion(tenant, 2, text=big)]) == []
    small, large = store.get(_id(tenant), "chatcmpl-1"), store.get(_id(tenant), "chatcmpl-2")
    assert small.body is not None and small.body_blob is None
    assert large.body is None and large.body_blob is not None
    assert large.body_blob.startswith(f"captures/{tenant.id}/")
    assert registry.blobs.exists(large.body_blob)
    request, response = store.bodies(large)
    assert request["messages"][0]["content"] == big
    assert response["choices"][0]["message"]["content"] == "yo"
    assert store.bodies(small)[0] == completion(tenant, 1).request
    assert (large.adapter, large.version, large.route, large.user) == ("bot", 1, "production", "u1")
    assert large.body_bytes > INLINE > small.body_bytes


def test_an_id_a_tenant_already_has_is_skipped_and_another_tenants_is_its_own(
    store: CaptureStore, tenant: Tenant, other: Tenant
) -> None:
    """The engine lets clients pick ids (``request_id``): ids may repeat, within a tenant
    (the first record stays) or across tenants (each keeps its own)."""
    store.save([completion(tenant, 1, text="first")])
    again = completion(tenant, 1, text="second" * 200)
    theirs = completion(other, 1, text="globex's")
    assert store.save([again, theirs, completion(tenant, 2)]) == [again]
    assert (
        store.bodies(store.get(_id(tenant), "chatcmpl-1"))[0]["messages"][0]["content"] == "first"
    )
    assert store.bodies(store.get(_id(other), "chatcmpl-1"))[0]["messages"][0]["content"] == (
        "globex's"
    )
    assert _ids(store.list_completions(_id(tenant), CompletionQuery())) == [
        "chatcmpl-1",
        "chatcmpl-2",
    ]
    assert _ids(store.list_completions(_id(other), CompletionQuery())) == ["chatcmpl-1"]


def test_a_foreign_id_is_not_found_like_an_unknown_one(
    store: CaptureStore, tenant: Tenant, other: Tenant
) -> None:
    store.save([completion(tenant, 1)])
    store.add_feedback(_id(tenant), "chatcmpl-1", FeedbackInput(thumbs="up"))
    messages = []
    theirs = _id(other)
    for completion_id in ("chatcmpl-1", "chatcmpl-9"):
        calls: list[Callable[[], object]] = [
            partial(store.get, theirs, completion_id),
            partial(store.update_metadata, theirs, completion_id, {"k": "v"}),
            partial(store.delete, theirs, completion_id),
            partial(store.add_feedback, theirs, completion_id, FeedbackInput(rating=1)),
            partial(store.list_feedback, theirs, FeedbackQuery(completion_id=completion_id)),
            partial(store.list_completions, theirs, CompletionQuery(after=completion_id)),
        ]
        for call in calls:
            with pytest.raises(NotFound) as raised:
                call()
            messages.append(str(raised.value).replace(completion_id, "ID"))
    assert messages[:6] == messages[6:]
    assert store.get(_id(tenant), "chatcmpl-1").metadata_ == {}
    assert store.list_feedback(_id(other), FeedbackQuery()) == []


def test_lists_filter_by_model_version_route_metadata_and_time(
    store: CaptureStore, tenant: Tenant
) -> None:
    store.save(
        [
            completion(tenant, 1, metadata={"topic": "billing", "a.b": "1"}),
            completion(tenant, 2, minutes=10, version=2, route="canary", metadata={"ü": "ß"}),
            completion(tenant, 3, minutes=20, model="demo-base", adapter="", version=None),
            completion(tenant, 4, minutes=30, metadata={"topic": "billing", "$k'": "x"}),
        ]
    )
    tenant_id = _id(tenant)

    def listed(**query: Any) -> list[str]:
        return _ids(store.list_completions(tenant_id, CompletionQuery(**query)))

    assert listed() == ["chatcmpl-1", "chatcmpl-2", "chatcmpl-3", "chatcmpl-4"]
    assert listed(model="demo-base") == ["chatcmpl-3"]
    assert listed(adapter="bot", version=1) == ["chatcmpl-1", "chatcmpl-4"]
    assert listed(route="canary") == ["chatcmpl-2"]
    assert listed(metadata={"topic": "billing"}) == ["chatcmpl-1", "chatcmpl-4"]
    assert listed(metadata={"topic": "billing", "a.b": "1"}) == ["chatcmpl-1"]
    assert listed(metadata={"ü": "ß"}) == ["chatcmpl-2"]
    assert listed(metadata={"$k'": "x"}) == ["chatcmpl-4"]
    assert listed(metadata={"topic": "other"}) == []
    window = {
        "created_after": T0 + dt.timedelta(minutes=10),
        "created_before": T0 + dt.timedelta(minutes=30),
    }
    assert listed(**window) == ["chatcmpl-2", "chatcmpl-3"]


def test_lists_page_forwards_and_backwards(store: CaptureStore, tenant: Tenant) -> None:
    store.save([completion(tenant, n, minutes=n) for n in range(1, 6)])
    tenant_id = _id(tenant)

    def page(**query: Any) -> list[str]:
        return _ids(store.list_completions(tenant_id, CompletionQuery(limit=2, **query)))

    assert page() == ["chatcmpl-1", "chatcmpl-2"]
    assert page(after="chatcmpl-2") == ["chatcmpl-3", "chatcmpl-4"]
    assert page(after="chatcmpl-4") == ["chatcmpl-5"]
    assert page(order="desc") == ["chatcmpl-5", "chatcmpl-4"]
    assert page(order="desc", after="chatcmpl-4") == ["chatcmpl-3", "chatcmpl-2"]


def test_metadata_is_replaced_and_checked(store: CaptureStore, tenant: Tenant) -> None:
    store.save([completion(tenant, 1, metadata={"old": "1"})])
    updated = store.update_metadata(_id(tenant), "chatcmpl-1", {"new": "2"})
    assert updated.metadata_ == {"new": "2"} == store.get(_id(tenant), "chatcmpl-1").metadata_
    with pytest.raises(InvalidRequest, match="at most 16 are allowed"):
        store.update_metadata(_id(tenant), "chatcmpl-1", {str(i): "v" for i in range(17)})
    assert store.get(_id(tenant), "chatcmpl-1").metadata_ == {"new": "2"}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({}, None),
        ({"k" * 64: "v" * 512}, None),
        ([], "must be an object"),
        ({str(i): "" for i in range(17)}, "has 17 keys"),
        ({"k" * 65: "v"}, "1 to 64 characters"),
        ({"": "v"}, "1 to 64 characters"),
        ({"k": "v" * 513}, "at most 512 characters"),
        ({"k": 1}, "must be a string"),
        ({'a"b': "v"}, "quote, backslash or control character"),
        ({"a\\b": "v"}, "quote, backslash or control character"),
        ({"k": "a\x00b"}, "holds a NUL character"),
    ],
)
def test_metadata_bounds_are_openais(value: Any, problem: str | None) -> None:
    found = metadata_problem(value)
    assert found is None if problem is None else (found is not None and problem in found)


def test_deleting_a_completion_deletes_its_feedback_and_its_blob(
    registry: Registry, store: CaptureStore, tenant: Tenant
) -> None:
    store.save([completion(tenant, 1, text="x" * INLINE), completion(tenant, 2)])
    key = store.get(_id(tenant), "chatcmpl-1").body_blob
    assert key is not None and registry.blobs.exists(key)
    store.add_feedback(_id(tenant), "chatcmpl-1", FeedbackInput(thumbs="down"))
    kept = store.add_feedback(_id(tenant), "chatcmpl-2", FeedbackInput(thumbs="up"))
    store.delete(_id(tenant), "chatcmpl-1")
    with pytest.raises(NotFound):
        store.get(_id(tenant), "chatcmpl-1")
    assert not registry.blobs.exists(key)
    assert [f.id for f in store.list_feedback(_id(tenant), FeedbackQuery())] == [kept.id]


def test_feedback_is_checked_scoped_listed_and_filtered(
    store: CaptureStore, tenant: Tenant
) -> None:
    store.save([completion(tenant, 1), completion(tenant, 2)])
    tenant_id = _id(tenant)
    up = store.add_feedback(tenant_id, "chatcmpl-1", FeedbackInput(thumbs="up", rating=5))
    fixed = FeedbackInput(thumbs="down", correction="the right answer", note="too short")
    down = store.add_feedback(tenant_id, "chatcmpl-2", fixed)
    only_note = store.add_feedback(tenant_id, "chatcmpl-1", FeedbackInput(note="hm"))
    assert down.id.startswith("feedback-") and down.correction == "the right answer"

    def listed(**query: Any) -> list[str]:
        return [f.id for f in store.list_feedback(tenant_id, FeedbackQuery(**query))]

    assert listed() == [up.id, down.id, only_note.id]
    assert listed(completion_id="chatcmpl-1") == [up.id, only_note.id]
    assert listed(thumbs="down") == [down.id]
    assert listed(order="desc", limit=2) == [only_note.id, down.id]
    assert listed(after=up.id) == [down.id, only_note.id]
    with pytest.raises(NotFound, match="feedback 'feedback-nope' does not exist"):
        listed(after="feedback-nope")
    pairs = list(store.with_completions(tenant_id, store.list_feedback(tenant_id, FeedbackQuery())))
    assert [(f.id, c.completion_id) for f, c in pairs] == [
        (up.id, "chatcmpl-1"), (down.id, "chatcmpl-2"), (only_note.id, "chatcmpl-1")
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        (FeedbackInput(), "at least one of"),
        (FeedbackInput(thumbs="sideways"), "thumbs must be 'up' or 'down'"),
        (FeedbackInput(rating=0), "rating must be an integer from 1 to 5"),
        (FeedbackInput(rating=6), "rating must be an integer from 1 to 5"),
        (FeedbackInput(correction="x" * ((64 << 10) + 1)), "correction is longer than"),
        (FeedbackInput(note="x" * 4097), "note is longer than 4096"),
        (FeedbackInput(note="a\x00b"), "may not hold NUL characters"),
    ],
)
def test_bad_feedback_is_refused(
    store: CaptureStore, tenant: Tenant, given: FeedbackInput, problem: str
) -> None:
    store.save([completion(tenant, 1)])
    with pytest.raises(InvalidRequest, match=problem):
        store.add_feedback(_id(tenant), "chatcmpl-1", given)
    assert store.list_feedback(_id(tenant), FeedbackQuery()) == []


def test_purge_deletes_what_is_past_each_tenants_retention_once(
    registry: Registry, store: CaptureStore, tenant: Tenant, other: Tenant
) -> None:
    store.set_settings(_id(tenant), CaptureSettings(enabled=True, retention_days=1), ADMIN)
    store.set_settings(_id(other), CaptureSettings(enabled=True, retention_days=30), ADMIN)
    now = utcnow()
    old, new = now - dt.timedelta(days=2), now - dt.timedelta(hours=1)
    store.save(
        [
            completion(tenant, 1, created_at=old, text="x" * INLINE),
            completion(tenant, 2, created_at=new),
            completion(other, 3, created_at=old),
        ]
    )
    key = store.get(_id(tenant), "chatcmpl-1").body_blob
    assert key is not None
    store.add_feedback(_id(tenant), "chatcmpl-1", FeedbackInput(thumbs="up"))
    assert store.purge(now) == 1
    assert store.purge(now) == 0
    assert _ids(store.list_completions(_id(tenant), CompletionQuery())) == ["chatcmpl-2"]
    assert _ids(store.list_completions(_id(other), CompletionQuery())) == ["chatcmpl-3"]
    assert store.list_feedback(_id(tenant), FeedbackQuery()) == []
    assert not registry.blobs.exists(key)
    assert store.purge(now + dt.timedelta(days=31)) == 2


def test_nul_characters_match_nothing_on_either_backend(
    store: CaptureStore, tenant: Tenant
) -> None:
    """PostgreSQL refuses NULs in query parameters: they are answered here, as no match."""
    store.save([completion(tenant, 1)])
    with pytest.raises(NotFound):
        store.get(_id(tenant), "chatcmpl-1\x00")
    with pytest.raises(NotFound, match="feedback"):
        store.list_feedback(_id(tenant), FeedbackQuery(after="feedback-\x00"))
    for query in (
        CompletionQuery(model="bot\x00"),
        CompletionQuery(route="\x00"),
        CompletionQuery(metadata={"k": "\x00"}),
        CompletionQuery(metadata={"\x00": "v"}),
    ):
        assert store.list_completions(_id(tenant), query) == []
