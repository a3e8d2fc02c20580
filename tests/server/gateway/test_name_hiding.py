"""LoRA names never reach a client: errors, whole answers and streams all pass through
``Route.hide``, whatever spacing the engine's JSON uses.

The engine's answer is a narrow fake (``FakeUpstream``): these tests are about the bytes
the gateway relays, not about talking to an engine.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.gateway import proxy
from server.gateway.resolution import Route, ServedVersion

LORA = "lx-0123456789abcdef"
ROUTE = Route("support@2", "acme", "f" * 64, LORA, ServedVersion("support", 2, LORA, "pinned"))


class _Content:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


class FakeUpstream:
    """An engine answer already received: a status and its body, in chunks."""

    def __init__(self, status: int, *chunks: bytes) -> None:
        self.status = status
        self.content = _Content(list(chunks))
        self.released = False

    async def read(self) -> bytes:
        return b"".join(self.content.chunks)

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        pass


async def run_asgi(reply: Any) -> bytes:
    """The body an ASGI reply sends."""
    sent: list[bytes] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            sent.append(message.get("body", b""))

    await reply({"type": "http"}, receive, send)
    return b"".join(sent)


@pytest.mark.parametrize("spacing", ["compact", "spaced"])
async def test_whole_answers_show_the_requested_model(spacing: str) -> None:
    payload = {"model": LORA, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    body = json.dumps(payload, separators=(",", ":") if spacing == "compact" else None)
    answer = await proxy.complete(FakeUpstream(200, body.encode()), ROUTE, proxy.Outcome())
    sent = await run_asgi(answer)
    assert LORA.encode() not in sent
    assert json.loads(sent)["model"] == "support@2"


async def test_engine_errors_show_the_requested_model() -> None:
    error = {"error": {"message": f"The model `{LORA}` does not exist.", "code": 404}}
    response = await proxy.error_from_engine(
        FakeUpstream(404, json.dumps(error, indent=2).encode()), ROUTE
    )
    assert LORA.encode() not in bytes(response.body)
    assert json.loads(response.body)["error"]["message"] == "The model `support@2` does not exist."


async def test_streamed_events_show_the_requested_model_in_any_spacing() -> None:
    events = [
        f'data: {{"model": "{LORA}", "choices": [{{"text": "a"}}]}}\n\n'.encode(),
        f'data: {{"model":"{LORA}","choices":[{{"text":"b"}}]}}\n\ndata: [DONE]\n\n'.encode(),
    ]
    relay = proxy.stream(FakeUpstream(200, *events), ROUTE, proxy.Outcome(), True)
    sent = await run_asgi(relay)
    assert LORA.encode() not in sent
    assert sent.count(b'"support@2"') == 2


async def test_a_shown_name_is_escaped_as_json_requires() -> None:
    route = Route('we"ird', "acme", "f" * 64, LORA, ServedVersion("x", 1, LORA, "production"))
    answer = await proxy.complete(
        FakeUpstream(200, f'{{"model": "{LORA}"}}'.encode()), route, proxy.Outcome()
    )
    assert json.loads(await run_asgi(answer))["model"] == 'we"ird'


def test_base_model_answers_pass_unchanged() -> None:
    base = Route("tiny-llama", "acme", "f" * 64, "tiny-llama")
    data = b'{"model":"tiny-llama","note":"lx-0123456789abcdef"}'
    assert base.hide(data) == data and base.headers() == []


class _GoneAfter(_Content):
    """Engine events, then the connection closed under the relay (the client left)."""

    def __init__(self, chunks: list[bytes], relay: list[proxy.Relay]) -> None:
        super().__init__(chunks)
        self.relay = relay

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        self.relay[0].client_gone = True  # what the relay's watcher sets on a disconnect
        raise proxy.aiohttp.ClientPayloadError("connection closed")


@pytest.mark.parametrize(("done_sent", "error"), [(True, ""), (False, "client_disconnected")])
async def test_a_client_that_leaves_after_done_got_a_whole_answer(
    done_sent: bool, error: str
) -> None:
    """The official client closes the connection once it reads ``[DONE]``, often before the
    engine's end of stream reaches the gateway: that answer is whole (captured, not an
    error); leaving before ``[DONE]`` is a disconnect."""
    events = [b'data: {"choices": [{"text": "a"}]}\n\n']
    if done_sent:
        events.append(b"data: [DONE]\n\n")
    upstream = FakeUpstream(200)
    relays: list[proxy.Relay] = []
    upstream.content = _GoneAfter(events, relays)
    outcome = proxy.Outcome()
    relay = proxy.stream(upstream, ROUTE, outcome, True)
    relays.append(relay)
    await run_asgi(relay)
    assert (outcome.status, outcome.error) == (200, error)
    assert outcome.finished_at is not None and upstream.released
