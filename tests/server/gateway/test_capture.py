"""The gateway's capture (server/gateway/capture.py): which requests it keeps, what it
keeps of their answers, the bounded queue that drops and counts, and the writer.

The registry is a real one on SQLite; the engine's answers are the narrow fake of
test_name_hiding (``FakeUpstream``): these tests are about the gateway's bytes and queue.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from registry import Actor, LocalBlobStore, Principal, Registry
from registry.captures import CaptureSettings, CaptureStore, CompletionQuery
from server.errors import APIError
from server.gateway import capture as capture_module
from server.gateway import proxy
from server.gateway.accounting import CHAT, COMPLETIONS
from server.gateway.capture import Capture, Pending, assemble_stream, completion_record
from server.gateway.metrics import Metrics
from server.gateway.resolution import Route, ServedVersion
from server.gateway.tenancy import Caller
from tests.server.gateway.test_name_hiding import LORA, FakeUpstream, run_asgi

ADMIN = Actor("test-admin", admin=True)
ROUTE = Route("support", "acme", "f" * 64, LORA, ServedVersion("support", 2, LORA, "canary"))


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "blobs"))


@pytest.fixture
def caller(registry: Registry) -> Caller:
    tenant_id = registry.create_tenant("acme", ADMIN).id
    assert tenant_id is not None
    return Caller(Principal(tenant_id, "tenant", 1), tenant_id, "acme")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def capture(registry: Registry, metrics: Metrics) -> Capture:
    return Capture(CaptureStore(registry), metrics, ttl=0, max_age=0)


def _turn_on(registry: Registry, caller: Caller, **settings: Any) -> None:
    CaptureStore(registry).set_settings(
        caller.tenant_id, CaptureSettings(enabled=True, **settings), ADMIN
    )


def _dropped(metrics: Metrics, reason: str) -> float:
    labels = {"tenant": "acme", "reason": reason}
    return metrics.registry.get_sample_value("loraplex_capture_dropped_total", labels) or 0.0


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": "support", "messages": [{"role": "user", "content": "hi"}], **fields}


def _answer(completion_id: str = "chatcmpl-1", content: str = "hello") -> bytes:
    choice = {"index": 0, "message": {"role": "assistant", "content": content}}
    payload = {"id": completion_id, "object": "chat.completion", "created": 1_800_000_000,
               "model": LORA, "choices": [choice],
               "usage": {"prompt_tokens": 4, "completion_tokens": 1}}  # fmt: skip
    return json.dumps(payload).encode()


async def test_only_chat_requests_of_a_capturing_tenant_that_ask_are_kept(
    capture: Capture, registry: Registry, caller: Caller
) -> None:
    assert await capture.begin(CHAT, caller, ROUTE, _body(store=True), "") is None  # off
    _turn_on(registry, caller)
    assert await capture.begin(CHAT, caller, ROUTE, _body(), "") is None  # OpenAI's default
    assert await capture.begin(CHAT, caller, ROUTE, _body(store=False), "") is None
    assert await capture.begin(COMPLETIONS, caller, ROUTE, _body(store=True), "") is None
    kept = await capture.begin(CHAT, caller, ROUTE, _body(store=True), "10")
    assert kept is not None and kept.request_bytes == 10
    _turn_on(registry, caller, store_by_default=True)
    assert await capture.begin(CHAT, caller, ROUTE, _body(), "") is not None
    assert await capture.begin(CHAT, caller, ROUTE, _body(store=False), "") is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"store": "yes"}, "store"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"metadata": "tag"}, "metadata"),
    ],
)
async def test_bad_store_or_metadata_is_a_400_whether_or_not_the_tenant_captures(
    capture: Capture, caller: Caller, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(APIError) as raised:
        await capture.begin(CHAT, caller, ROUTE, _body(**fields), "")
    assert (raised.value.status, raised.value.param) == (400, param)


async def test_a_whole_answer_is_stored_with_what_served_it(
    capture: Capture, registry: Registry, caller: Caller, metrics: Metrics
) -> None:
    _turn_on(registry, caller)
    body = _body(store=True, metadata={"topic": "a"}, user="u7")
    pending = await capture.begin(CHAT, caller, ROUTE, body, "")
    assert pending is not None
    outcome = proxy.Outcome(on_finish=[pending.finished], kept=pending.kept)
    answer = await proxy.complete(FakeUpstream(200, _answer()), ROUTE, outcome)
    sent = await run_asgi(answer)
    await capture.flush()
    store = CaptureStore(registry)
    (row,) = store.list_completions(caller.tenant_id, CompletionQuery())
    request, response = store.bodies(row)
    assert response == json.loads(sent)  # what the client got: the LoRA name hidden
    assert response["model"] == "support" and request == body
    assert (row.completion_id, row.model, row.adapter, row.version, row.route) == (
        "chatcmpl-1", "support", "support", 2, "canary"
    )  # fmt: skip
    assert (row.user, row.metadata_, row.prompt_tokens, row.completion_tokens) == (
        "u7", {"topic": "a"}, 4, 1
    )  # fmt: skip
    assert int(row.created_at.timestamp()) == 1_800_000_000
    captured = metrics.registry.get_sample_value("loraplex_captured_total", {"tenant": "acme"})
    assert captured == 1.0


async def test_a_streamed_answer_is_stored_as_one_completion(
    capture: Capture, registry: Registry, caller: Caller
) -> None:
    _turn_on(registry, caller)
    pending = await capture.begin(CHAT, caller, ROUTE, _body(store=True, stream=True), "")
    assert pending is not None
    head = f'"id": "chatcmpl-s", "created": 1800000000, "model": "{LORA}"'
    events = [
        f'data: {{{head}, "choices": [{{"index": 0, "delta": {{"role": "assistant"}}}}]}}\n\n',
        f'data: {{{head}, "choices": [{{"index": 0, "delta": {{"content": "hel"}}}}]}}\n\n',
        f'data: {{{head}, "choices": [{{"index": 0, "delta": {{"content": "lo"}}, '
        '"finish_reason": "stop"}]}\n\n',
        f'data: {{{head}, "choices": [], "usage": {{"prompt_tokens": 4, "completion_tokens": 2}}}}'
        "\n\ndata: [DONE]\n\n",
    ]
    outcome = proxy.Outcome(on_finish=[pending.finished], kept=pending.kept)
    relay = proxy.stream(FakeUpstream(200, *(e.encode() for e in events)), ROUTE, outcome, False)
    await run_asgi(relay)
    await capture.flush()
    store = CaptureStore(registry)
    (row,) = store.list_completions(caller.tenant_id, CompletionQuery())
    _, response = store.bodies(row)
    assert (row.completion_id, row.stream, row.completion_tokens) == ("chatcmpl-s", True, 2)
    assert response["model"] == "support"
    assert response["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "hello"},
         "finish_reason": "stop", "logprobs": None}
    ]  # fmt: skip
    assert response["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_streamed_choices_and_tool_calls_are_assembled_by_index() -> None:
    def event(choice: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps({"id": "c", "created": 1, "choices": [choice]}).encode()

    def arguments(text: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}

    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_w"}}
    events = [
        event({"index": 1, "delta": {"role": "assistant", "content": "B"}}),
        event({"index": 0, "delta": {"tool_calls": [call]}}),
        event({"index": 0, "delta": arguments('{"a"')}),
        event({"index": 0, "delta": arguments(":1}"), "finish_reason": "tool_calls"}),
        b'data: {"error": {"message": "ignored"}}',
        b"data: [DONE]",
    ]
    completion = assemble_stream(b"\n\n".join(events), None)
    assert completion is not None
    first, second = completion["choices"]
    assert first["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_w", "arguments": '{"a":1}'}}
    ]
    assert (first["finish_reason"], second["message"]["content"]) == ("tool_calls", "B")
    assert assemble_stream(b"data: [DONE]\n\n", None) is None


async def test_answers_over_the_tenants_limit_are_dropped_and_counted(
    capture: Capture, registry: Registry, caller: Caller, metrics: Metrics
) -> None:
    _turn_on(registry, caller, max_body_bytes=100)
    assert await capture.begin(CHAT, caller, ROUTE, _body(store=True), "101") is None
    assert _dropped(metrics, "too_large") == 1
    pending = await capture.begin(CHAT, caller, ROUTE, _body(store=True), "")
    assert pending is not None
    outcome = proxy.Outcome(on_finish=[pending.finished], kept=pending.kept)
    await proxy.complete(FakeUpstream(200, _answer(content="x" * 200)), ROUTE, outcome)
    assert pending.kept.over and pending.kept.chunks == []
    assert _dropped(metrics, "too_large") == 2
    await capture.flush()
    assert CaptureStore(registry).list_completions(caller.tenant_id, CompletionQuery()) == []


def _pending(capture: Capture, caller: Caller, answer: bytes, body: dict[str, Any]) -> Pending:
    kept = proxy.KeptAnswer(1 << 20)
    kept.add(answer)
    return Pending(capture, caller.tenant_id, ROUTE, body, 0, kept)


async def test_a_full_queue_drops_and_counts_and_the_rest_is_written(
    capture: Capture, registry: Registry, caller: Caller, metrics: Metrics,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(capture_module, "QUEUE_ITEMS", 2)
    for number in range(3):
        capture.offer(_pending(capture, caller, _answer(f"chatcmpl-{number}"), _body()))
    assert _dropped(metrics, "queue_full") == 1
    await capture.flush()
    capture.offer(_pending(capture, caller, _answer("chatcmpl-0"), _body()))  # an id seen before
    capture.offer(_pending(capture, caller, b"not json", _body()))
    await capture.flush()
    ids = CaptureStore(registry).list_completions(caller.tenant_id, CompletionQuery())
    assert [row.completion_id for row in ids] == ["chatcmpl-0", "chatcmpl-1"]
    assert (_dropped(metrics, "duplicate"), _dropped(metrics, "unreadable")) == (1, 1)


def test_an_undeclared_request_over_the_limit_is_not_stored(caller: Caller) -> None:
    kept = proxy.KeptAnswer(50)
    kept.add(_answer()[:10])
    unused: Any = None  # the record is built without the capture it would join
    pending = Pending(unused, caller.tenant_id, ROUTE, _body(padding="p" * 60), 0, kept)
    assert completion_record(pending) == ("too_large", None)


async def test_a_failed_write_is_dropped_and_counted(
    capture: Capture, caller: Caller, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(records: Any) -> Any:
        raise OSError("database gone")

    monkeypatch.setattr(capture.store, "save", broken)
    capture.offer(_pending(capture, caller, _answer(), _body()))
    await capture.flush()
    assert _dropped(metrics, "write_failed") == 1


async def test_the_writer_task_writes_what_is_offered_while_it_runs(
    capture: Capture, registry: Registry, caller: Caller
) -> None:
    capture.offer(_pending(capture, caller, _answer("chatcmpl-early"), _body()))
    writer = asyncio.create_task(capture.run())
    capture.offer(_pending(capture, caller, _answer("chatcmpl-late"), _body()))
    store = CaptureStore(registry)
    try:
        for _ in range(500):  # until both are written (a bound, not a timing assertion)
            if len(store.list_completions(caller.tenant_id, CompletionQuery())) == 2:
                break
            await asyncio.sleep(0.02)
    finally:
        writer.cancel()
    rows = store.list_completions(caller.tenant_id, CompletionQuery())
    assert [row.completion_id for row in rows] == ["chatcmpl-early", "chatcmpl-late"]
