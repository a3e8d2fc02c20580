"""Prompt drift (registry.drift): the sketch and the score's properties, and the store on
SQLite and on PostgreSQL: references, live sketches merged per day (by concurrent
writers too), reports, unknown drift, tenant isolation and one event per crossing."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ADMIN

from registry import AdapterVersion, InvalidRequest, NotFound, Registry, Tenant
from registry.drift import (
    DRIFT,
    DRIFT_CLEARED,
    HASHED_CHARS,
    LENGTH_BUCKETS,
    MAX_DAYS,
    NGRAM_BUCKETS,
    DriftStore,
    InvalidSketch,
    PromptSketch,
    drift_score,
    js_distance,
    length_bucket,
    merge,
    prompts_of,
    sketch_prompts,
    today,
)

ACTOR = ADMIN
NOUNS = ("cat", "dog", "boat", "house", "tree", "river", "car", "bird", "lamp", "chair")
TEMPLATES = ("What color is the {}?", "Where is the {}?", "Tell me about the {}.")
OFF_TOPIC = (
    "How do I reset my router password after the firmware update broke the login page?",
    "Explain the tax implications of exercising stock options before the company goes public.",
    "Why does my Kubernetes pod keep restarting with exit code 137 during the nightly batch?",
)


def on_topic(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(TEMPLATES).format(rng.choice(NOUNS)) for _ in range(n)]


def off_topic(n: int) -> list[str]:
    return [OFF_TOPIC[i % len(OFF_TOPIC)] for i in range(n)]


# -- sketches and scores -----------------------------------------------------------------


def test_a_sketch_counts_prompts_lengths_and_ngrams() -> None:
    sketch = sketch_prompts(["Where is the cat?", "", "one two three four five six seven eight"])
    assert sketch.prompts == 3
    assert len(sketch.lengths) == LENGTH_BUCKETS and len(sketch.ngrams) == NGRAM_BUCKETS
    # 4 words -> bucket 3 (4-7), 0 words -> bucket 0, 8 words -> bucket 4 (8-15)
    assert sketch.lengths[0] == sketch.lengths[3] == sketch.lengths[4] == 1
    assert sum(sketch.ngrams) == (4 + 3) + 0 + (8 + 7)  # unigrams + bigrams
    assert [length_bucket(n) for n in (0, 1, 2, 3, 4, 1023, 1024, 10**6)] == [
        0, 1, 2, 2, 3, 10, 11, 11
    ]  # fmt: skip


def test_sketches_are_stable_case_blind_and_bounded() -> None:
    assert sketch_prompts(["Where IS the Cat?"]) == sketch_prompts(["where is the cat?"])
    words = HASHED_CHARS // 8
    long = "abcdefg " * words + "tail " * 1000  # the words past the first 4 KiB: not hashed
    assert sum(sketch_prompts([long]).ngrams) == 2 * words - 1


def test_merge_is_the_sketch_of_both_and_json_round_trips() -> None:
    a, b = on_topic(10, 1), off_topic(5)
    assert merge(sketch_prompts(a), sketch_prompts(b)) == sketch_prompts(a + b)
    sketch = sketch_prompts(a)
    assert PromptSketch.from_json(sketch.to_json()) == sketch
    with pytest.raises(InvalidSketch):
        PromptSketch.from_json({**sketch.to_json(), "ngrams": [1, 2]})
    with pytest.raises(InvalidSketch):
        PromptSketch.from_json({**sketch.to_json(), "prompts": -1})


def test_identical_prompts_score_zero_disjoint_ones_one_and_the_score_is_symmetric() -> None:
    same = sketch_prompts(on_topic(50, 1))
    assert drift_score(same, same) == pytest.approx(0.0, abs=1e-6)
    short, long = sketch_prompts(["alpha beta"]), sketch_prompts(["gamma " * 300])
    assert js_distance(short.lengths, long.lengths) == pytest.approx(1.0)
    assert js_distance([3, 0], [0, 5]) == pytest.approx(1.0)
    assert js_distance([0, 0], [0, 0]) == 0.0 and js_distance([0, 0], [1, 0]) == 1.0
    a, b = sketch_prompts(on_topic(40, 2)), sketch_prompts(off_topic(40))
    assert drift_score(a, b) == pytest.approx(drift_score(b, a))
    assert 0.0 <= drift_score(a, b) <= 1.0


def test_the_same_distribution_scores_low_and_other_prompts_high() -> None:
    reference = sketch_prompts(on_topic(200, 1))
    similar = drift_score(reference, sketch_prompts(on_topic(30, 2)))
    other = drift_score(reference, sketch_prompts(off_topic(30)))
    assert similar < 0.25 < 0.6 < other


def test_prompts_of_requests_and_examples() -> None:
    chat = {
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "last"}, {"type": "image"}]},
        ]
    }
    assert prompts_of(chat) == ["last"]
    assert prompts_of({"prompt": "hi", "completion": "yo"}) == ["hi"]
    assert prompts_of({"prompt": ["a", "b"]}) == ["a", "b"]
    assert prompts_of({"prompt": [1, 2, 3]}) == []
    preference = {"prompt": [{"role": "user", "content": "q"}], "chosen": "x", "rejected": "y"}
    assert prompts_of(preference) == ["q"]
    assert prompts_of({"messages": "nonsense"}) == prompts_of({"model": "m"}) == []


# -- the store ---------------------------------------------------------------------------


@pytest.fixture
def store(registry: Registry) -> DriftStore:
    return DriftStore(registry)


def _id(tenant: Tenant) -> int:
    assert tenant.id is not None
    return tenant.id


@pytest.fixture
def trained(
    registry: Registry, store: DriftStore, tenant: Tenant, bot_v1: AdapterVersion
) -> AdapterVersion:
    """acme's bot v1 in production, with a reference from on-topic prompts."""
    assert bot_v1.id is not None
    store.set_reference(bot_v1.id, sketch_prompts(on_topic(200, 1)))
    registry.promote(_id(tenant), "bot", 1, ADMIN)
    return bot_v1


def test_drift_is_unknown_without_production_reference_or_enough_prompts(
    registry: Registry, store: DriftStore, tenant: Tenant, bot_v1: AdapterVersion
) -> None:
    report = store.report(_id(tenant), "bot")
    assert report.score is None and "no production version" in (report.reason or "")
    registry.promote(_id(tenant), "bot", 1, ADMIN)
    store.add_live(_id(tenant), "bot", sketch_prompts(on_topic(30, 2)))
    report = store.report(_id(tenant), "bot")
    assert (report.score, report.version, report.live_prompts) == (None, 1, 30)
    assert "no reference sketch" in (report.reason or "") and not report.over
    assert bot_v1.id is not None
    store.set_reference(bot_v1.id, sketch_prompts(on_topic(100, 1)))
    assert store.report(_id(tenant), "bot").score is not None
    few = DriftStore(registry, min_live_prompts=31).report(_id(tenant), "bot")
    assert few.score is None and "at least 31" in (few.reason or "")


def test_live_sketches_merge_per_day_and_reports_cover_the_window(
    store: DriftStore, tenant: Tenant, trained: AdapterVersion
) -> None:
    tid = _id(tenant)
    store.add_live(tid, "bot", sketch_prompts(on_topic(15, 2)))
    store.add_live(tid, "bot", sketch_prompts(on_topic(15, 3)))
    store.add_live(tid, "bot", sketch_prompts(off_topic(40)), day=today() - dt.timedelta(days=9))
    assert store.live(tid, "bot").prompts == 30
    assert store.live(tid, "bot", days=10).prompts == 70
    report = store.report(tid, "bot", threshold=0.35)
    assert report.score is not None and report.score < 0.35 and not report.over
    assert (report.live_prompts, report.reference_prompts, report.version) == (30, 200, 1)
    assert report.lengths is not None and report.ngrams is not None
    assert report.score == pytest.approx((report.lengths + report.ngrams) / 2)
    wide = store.report(tid, "bot", days=10, threshold=0.35)
    assert wide.score is not None and wide.score > report.score
    with pytest.raises(InvalidRequest):
        store.report(tid, "bot", days=0)
    with pytest.raises(InvalidRequest):
        store.report(tid, "bot", threshold=1.5)


def test_purge_deletes_only_days_no_report_reaches(
    store: DriftStore, tenant: Tenant, trained: AdapterVersion
) -> None:
    tid = _id(tenant)
    for age in (0, 5, 90, 91, 400):
        day = today() - dt.timedelta(days=age)
        store.add_live(tid, "bot", sketch_prompts(on_topic(1, age)), day=day)
    assert store.purge() == 3
    assert store.live(tid, "bot", days=MAX_DAYS).prompts == 2
    assert store.purge(keep_days=3) == 1 and store.live(tid, "bot", days=MAX_DAYS).prompts == 1


def test_concurrent_writers_lose_no_prompts(
    make_registry: Callable[[], Registry],
    store: DriftStore,
    tenant: Tenant,
    trained: AdapterVersion,
) -> None:
    stores = [DriftStore(make_registry()) for _ in range(4)]

    def add(i: int) -> None:
        stores[i % 4].add_live(_id(tenant), "bot", sketch_prompts(on_topic(5, i)))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(24)))
    assert store.live(_id(tenant), "bot").prompts == 120


def test_a_foreign_adapter_is_answered_like_an_unknown_one(
    registry: Registry, store: DriftStore, trained: AdapterVersion
) -> None:
    other = _id(registry.create_tenant("globex", ADMIN))
    with pytest.raises(NotFound) as foreign:
        store.report(other, "bot")
    with pytest.raises(NotFound) as unknown:
        store.report(other, "zzz")
    assert str(foreign.value).replace("bot", "zzz") == str(unknown.value)
    with pytest.raises(NotFound):
        store.state(other, "bot")
    with pytest.raises(NotFound):
        store.report(other, "bot\x00")


def test_an_event_is_recorded_once_per_crossing(
    registry: Registry, store: DriftStore, tenant: Tenant, trained: AdapterVersion
) -> None:
    tid = _id(tenant)

    def events() -> list[str]:
        found = registry.audit_log(tenant_id=tid, subject_prefix="adapter:acme/bot")
        return [e.action for e in found if e.action in (DRIFT, DRIFT_CLEARED)]

    store.add_live(tid, "bot", sketch_prompts(on_topic(30, 2)))
    assert not store.check(tid, "bot", ACTOR, threshold=0.35).over
    assert events() == []
    store.add_live(tid, "bot", sketch_prompts(off_topic(120)))
    for _ in range(3):  # every flush checks; only the first past the threshold records
        report = store.check(tid, "bot", ACTOR, threshold=0.35)
        assert report.over
    assert events() == [DRIFT]
    state = store.state(tid, "bot")
    assert state is not None and state.over and state.score == report.score
    event = registry.audit_log(tenant_id=tid, action=DRIFT)[-1]
    assert event.after is not None and event.after["version"] == 1
    assert event.after["score"] == pytest.approx(report.score)
    cleared = store.check(tid, "bot", ACTOR, threshold=0.99)
    store.check(tid, "bot", ACTOR, threshold=0.99)
    assert not cleared.over and events() == [DRIFT, DRIFT_CLEARED]


def test_unknown_drift_is_neither_a_crossing_nor_a_clearing(
    registry: Registry, store: DriftStore, tenant: Tenant, trained: AdapterVersion
) -> None:
    tid = _id(tenant)
    store.add_live(tid, "bot", sketch_prompts(off_topic(40)))
    assert store.check(tid, "bot", ACTOR).over
    strict = DriftStore(registry, min_live_prompts=1000)
    report = strict.check(tid, "bot", ACTOR)
    assert report.score is None
    state = strict.state(tid, "bot")
    assert state is not None and state.over and state.score is None
    actions = [e.action for e in registry.audit_log(tenant_id=tid)]
    assert actions.count(DRIFT) == 1 and DRIFT_CLEARED not in actions
