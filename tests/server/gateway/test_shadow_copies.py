"""Narrow unit tests of the gateway's shadow copies (server/gateway/shadow.py), with fakes:
a fake store collects the batches, a fake forwarder answers as an engine would. The real
engine, gateway and registry are in tests/e2e/test_shadow.py."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

import router
from registry.shadow import ShadowBatch
from server.gateway.metrics import Metrics
from server.gateway.proxy import KeptAnswer, Outcome, UpstreamFailure
from server.gateway.resolution import Route, ServedVersion
from server.gateway.shadow import MAX_BOOK_PAIRS, Shadow, ShadowCopy, answer_texts
from server.gateway.tenancy import Caller
from tests.server.gateway.test_name_hiding import FakeUpstream

CANDIDATE = router.VersionView(2, "lora-cand", "fp")
ROUTE = Route(
    "bot", "acme", "fp", "lora-prod", ServedVersion("bot", 1, "lora-prod", router.PRODUCTION),
    router.ShadowTarget(CANDIDATE, 0.5),
)  # fmt: skip
CHAT = "/v1/chat/completions"


def _chat(text: str, prompt: int = 5, completion: int = 2) -> bytes:
    return orjson.dumps({
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
    })  # fmt: skip


class FakeStore:
    def __init__(self, fails: bool = False) -> None:
        self.batches: list[ShadowBatch] = []
        self.fails = fails

    def add(self, batch: ShadowBatch) -> None:
        if self.fails:
            raise OSError("database down")
        self.batches.append(batch)


class FakeGate:
    enabled = True

    def __init__(self) -> None:
        self.is_crowded = False

    def crowded(self, base: str, body: dict[str, Any]) -> bool:
        return self.is_crowded

    def last_in_line(self, body: dict[str, Any]) -> None:
        body["priority"] = router.PRIORITY_LEVELS


class FakeEngine:
    name = "engine-0"
    in_flight = 0

    def __init__(self) -> None:
        self.served_loras: list[str] = []

    def served(self, lora: str) -> None:
        self.served_loras.append(lora)


class FakeForwarder:
    """Answers every copy with ``answer`` (or raises it), recording what it was sent."""

    def __init__(self, answer: FakeUpstream | Exception) -> None:
        self.fair_queue = FakeGate()
        self.answer = answer
        self.sent: list[dict[str, Any]] = []
        self.engine = FakeEngine()

    async def open(self, candidates: list[Any], path: str, body: dict[str, Any]) -> Any:
        self.sent.append(dict(body))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer, self.engine

    async def ask(self, candidates: list[Any], path: str, body: dict[str, Any]) -> Any:
        upstream, engine = await self.open(candidates, path, body)
        return upstream.status, await upstream.read(), engine


class FakeReplicas:
    def candidates(self, base: str, lora: str | None) -> list[Any]:
        return [object()]


def _shadow(
    forwarder: FakeForwarder, store: FakeStore | None = None, draw: float = 0.1, slots: int = 4
) -> tuple[Shadow, FakeStore, Metrics]:
    store = store or FakeStore()
    metrics = Metrics()
    shadow = Shadow(store, FakeReplicas(), forwarder, metrics, slots, lambda: draw)  # type: ignore[arg-type]
    return shadow, store, metrics


def _caller() -> Caller:
    return Caller(None, 7, "acme")  # type: ignore[arg-type]


def _answered(shadow: Shadow, body: dict[str, Any], answer: bytes) -> ShadowCopy:
    """A sampled request whose production answer ``answer`` just ended."""
    copy = shadow.begin(CHAT, _caller(), ROUTE, body)
    assert copy is not None
    outcome = Outcome()
    Shadow.attach(copy, outcome)
    assert outcome.kept is not None
    outcome.kept.add(answer)
    outcome.status = 200
    outcome.finish()
    return copy


def _count(metrics: Metrics, outcome: str) -> float:
    return metrics.shadow_copies.labels("acme", outcome)._value.get()  # type: ignore[attr-defined]


async def _settle(shadow: Shadow) -> None:
    while shadow._tasks:
        await asyncio.sleep(0)


async def test_a_sampled_request_is_copied_after_its_answer_and_the_pair_recorded() -> None:
    forwarder = FakeForwarder(FakeUpstream(200, _chat(" yes ", 6, 3)))
    shadow, store, metrics = _shadow(forwarder)
    body = {"model": "bot", "messages": [], "stream": True, "stream_options": {}, "priority": 0}
    _answered(shadow, body, b'data: {"choices":[{"index":0,"delta":{"content":"yes"}}]}\n\n')
    await _settle(shadow)
    [sent] = forwarder.sent
    assert sent["model"] == "lora-cand" and sent["stream"] is False
    assert "stream_options" not in sent and sent["priority"] == router.PRIORITY_LEVELS
    assert body["model"] == "bot"  # the client's request is not the copy
    assert forwarder.engine.served_loras == ["lora-cand"]
    await shadow.flush()
    [batch] = store.batches
    assert (batch.tenant_id, batch.adapter, batch.candidate, batch.production) == (7, "bot", 2, 1)
    assert batch.pairs == [(["yes"], [" yes "])]
    assert (batch.prompt_tokens, batch.completion_tokens) == (6, 3)
    assert _count(metrics, "answered") == 1
    await shadow.flush()
    assert len(store.batches) == 1  # the book was emptied


async def test_requests_over_the_share_or_without_a_shadow_are_not_copied() -> None:
    shadow, _, _ = _shadow(FakeForwarder(FakeUpstream(200, _chat("x"))), draw=0.5)
    assert shadow.begin(CHAT, _caller(), ROUTE, {"model": "bot"}) is None  # 0.5 >= 0.5
    unshadowed = Route("bot", "acme", "fp", "lora-prod", ROUTE.version)
    shadow, _, _ = _shadow(FakeForwarder(FakeUpstream(200, _chat("x"))))
    assert shadow.begin(CHAT, _caller(), unshadowed, {"model": "bot"}) is None
    shadow, _, _ = _shadow(FakeForwarder(FakeUpstream(200, _chat("x"))), slots=0)
    assert shadow.begin(CHAT, _caller(), ROUTE, {"model": "bot"}) is None  # shadow off


async def test_a_failed_answer_sends_no_copy_and_capture_shares_its_kept_bytes() -> None:
    forwarder = FakeForwarder(FakeUpstream(200, _chat("x")))
    shadow, _, _ = _shadow(forwarder)
    copy = shadow.begin(CHAT, _caller(), ROUTE, {"model": "bot"})
    outcome = Outcome(kept=KeptAnswer(100))
    Shadow.attach(copy, outcome)
    assert copy is not None and copy.kept is outcome.kept
    outcome.status, outcome.error = 502, "engine_error"
    outcome.finish()
    await _settle(shadow)
    assert forwarder.sent == []


async def test_copies_are_dropped_not_queued_when_slots_or_replicas_are_full() -> None:
    forwarder = FakeForwarder(FakeUpstream(200, _chat("x")))
    shadow, _, metrics = _shadow(forwarder, slots=1)
    _answered(shadow, {"model": "bot"}, _chat("x"))
    _answered(shadow, {"model": "bot"}, _chat("x"))  # the one slot is taken
    forwarder.fair_queue.is_crowded = True
    await _settle(shadow)
    _answered(shadow, {"model": "bot"}, _chat("x"))  # someone waits at the fair queue
    assert len(forwarder.sent) == 1
    assert (_count(metrics, "answered"), _count(metrics, "busy")) == (1, 2)


@pytest.mark.parametrize(
    "answer",
    [FakeUpstream(500, b"{}"), FakeUpstream(200, b"{}"), UpstreamFailure(503, "down", "x")],
)
async def test_a_candidate_that_does_not_answer_is_counted_failed(answer: Any) -> None:
    shadow, store, metrics = _shadow(FakeForwarder(answer))
    _answered(shadow, {"model": "bot"}, _chat("x"))
    await _settle(shadow)
    await shadow.flush()
    [batch] = store.batches
    assert (batch.failed, batch.pairs) == (1, [])
    assert _count(metrics, "failed") == 1


async def test_an_unreadable_production_answer_and_a_full_book_are_counted() -> None:
    shadow, _, metrics = _shadow(FakeForwarder(FakeUpstream(200, _chat("x"))))
    _answered(shadow, {"model": "bot"}, b"not json")
    assert _count(metrics, "unreadable") == 1
    shadow._book_pairs = MAX_BOOK_PAIRS
    _answered(shadow, {"model": "bot"}, _chat("x"))
    await _settle(shadow)
    assert _count(metrics, "book_full") == 1


async def test_a_write_that_fails_drops_the_batch_and_counts_it() -> None:
    shadow, _, metrics = _shadow(FakeForwarder(FakeUpstream(200, _chat("x"))), FakeStore(True))
    _answered(shadow, {"model": "bot"}, _chat("x"))
    await _settle(shadow)
    await shadow.flush()
    assert _count(metrics, "write_failed") == 1
    assert shadow._book == {}


def test_answer_texts_of_chat_completions_and_streams() -> None:
    assert answer_texts(_chat("hi"), streamed=False) == ["hi"]
    two = {"choices": [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}]}
    assert answer_texts(orjson.dumps(two), streamed=False) == ["a", "b"]
    events = (
        b'data: {"choices":[{"index":1,"delta":{"role":"assistant","content":""}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"he"}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"y"}},{"index":1,"text":"z"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    assert answer_texts(events, streamed=True) == ["hey", "z"]
    for bad in (b"", b"[]", b'{"choices": []}', b"data: {oops}\n\n"):
        assert answer_texts(bad, streamed=bad.startswith(b"data")) is None
