"""The gateway's live drift book (server/gateway/drift.py): what it keeps of a request,
its bound (drops counted), and its flush: the live sketch in a real SQLite registry, the
``loraplex_adapter_drift`` gauge, and the audit event past the threshold."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from registry import Actor, LocalBlobStore, Registry
from registry.drift import DRIFT, MEASURED_CHARS, DriftStore, sketch_prompts
from server.gateway import drift as drift_module
from server.gateway.drift import DriftBook
from server.gateway.metrics import Metrics
from server.gateway.resolution import Route, ServedVersion
from tests.registry.registry_testdata import build_adapter, build_tiny_base

ADMIN = Actor("test-admin", admin=True)
LORA = "lora-x"
ROUTE = Route("support", "acme", "f" * 64, LORA, ServedVersion("support", 1, LORA, "production"))
BASE_ROUTE = Route("tiny", "acme", "f" * 64, "tiny")
ON_TOPIC = [f"Where is the {noun}?" for noun in ("cat", "dog", "boat", "tree", "lamp")]
OFF_TOPIC = "Explain the tax implications of exercising stock options before an IPO, please."


def _chat(text: str) -> dict[str, object]:
    return {"model": "support", "messages": [{"role": "user", "content": text}]}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("drift-book")
    base = build_tiny_base(root / "tiny")
    return base, build_adapter(base, root / "v1", seed=1)


@pytest.fixture
def registry(tmp_path: Path, built: tuple[Path, Path]) -> Registry:
    """Tenant acme's adapter support, v1 in production, with an on-topic reference."""
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "blobs"))
    tenant_id = registry.create_tenant("acme", ADMIN).id
    assert tenant_id == 1
    registry.register_base(built[0], "tiny", "r1", ADMIN)
    version = registry.push_adapter(tenant_id, "support", built[1], "tiny", ADMIN)
    registry.promote(tenant_id, "support", 1, ADMIN)
    assert version.id is not None
    DriftStore(registry).set_reference(version.id, sketch_prompts(ON_TOPIC * 40))
    return registry


@pytest.fixture
def book(registry: Registry, metrics: Metrics) -> DriftBook:
    return DriftBook(DriftStore(registry, min_live_prompts=10), metrics, threshold=0.35)


def _score(metrics: Metrics) -> float | None:
    labels = {"tenant": "acme", "adapter": "support"}
    return metrics.registry.get_sample_value("loraplex_adapter_drift", labels)


def test_it_keeps_the_prompt_of_requests_to_adapters_only(book: DriftBook) -> None:
    book.offer(1, BASE_ROUTE, _chat("to the base"))
    assert book.pending == 0
    book.offer(1, ROUTE, _chat("x" * (MEASURED_CHARS + 100)))
    book.offer(1, ROUTE, {"model": "support", "prompt": ["a b", "c d"]})
    book.offer(1, ROUTE, {"model": "support", "prompt": [1, 2, 3]})  # token ids: no text
    assert book.pending == 3
    kept = book._pending[(1, "acme", "support")]
    assert [len(t) for t in kept] == [MEASURED_CHARS, 3, 3]


def test_past_its_bound_prompts_are_dropped_and_counted(
    book: DriftBook, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drift_module, "MAX_PENDING", 3)
    for _ in range(5):
        book.offer(1, ROUTE, _chat("Where is the cat?"))
    assert book.pending == 3
    dropped = metrics.registry.get_sample_value(
        "loraplex_drift_prompts_dropped_total", {"tenant": "acme"}
    )
    assert dropped == 2
    monkeypatch.setattr(drift_module, "MAX_PENDING_CHARS", 10)
    asyncio.run(book.flush())
    book.offer(1, ROUTE, _chat("this prompt has more than ten characters"))
    assert book.pending == 0


def test_a_flush_stores_the_sketch_sets_the_gauge_and_records_a_crossing(
    book: DriftBook, registry: Registry, metrics: Metrics
) -> None:
    def flush(texts: list[str]) -> None:
        for text in texts:
            book.offer(1, ROUTE, _chat(text))
        asyncio.run(book.flush())
        assert book.pending == 0

    flush(ON_TOPIC)
    assert _score(metrics) is None  # 5 live prompts: too few to score
    flush(ON_TOPIC * 2)
    low = _score(metrics)
    assert low is not None and low < 0.35
    assert DriftStore(registry).live(1, "support").prompts == 15
    flush([OFF_TOPIC] * 60)
    high = _score(metrics)
    assert high is not None and high > 0.35
    flush([OFF_TOPIC] * 5)
    events = registry.audit_log(tenant_id=1, action=DRIFT)
    assert len(events) == 1 and events[0].actor == "gateway:drift"
    assert events[0].subject == "adapter:acme/support"
