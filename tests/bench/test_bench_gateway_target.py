"""The benchmark's loraplex target (``loraplex serve`` in front of the real stub upstream) is a
working gateway through its hot path: the official ``openai`` client gets answers, streams,
usage and OpenAI-shaped errors, and metrics count what happened. The figures bench.gateway
reports are only worth something if this holds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from bench import targets

CHUNKS = 20
CHUNK_MS = 50.0
"""The stub streams 20 events 50 ms apart: a stream takes about a second."""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[targets.Running]:
    work: Path = tmp_path_factory.mktemp("gateway-target")
    stub = targets.start_stub(work, stream_chunks=CHUNKS, chunk_interval_ms=CHUNK_MS)
    try:
        running = targets.start_loraplex(work, stub.url)
        yield running
        running.stop()
    finally:
        stub.stop()


@pytest.fixture
def client(gateway: targets.Running) -> OpenAI:
    return OpenAI(base_url=gateway.url + "/v1", api_key=gateway.api_key, max_retries=0)


def metric(gateway: targets.Running, name: str, **labels: str) -> float:
    """A sample's value from the gateway's /metrics (0 when the series does not exist)."""
    text = httpx.get(gateway.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_chat_answer_echoes_the_model_and_is_counted(
    gateway: targets.Running, client: OpenAI
) -> None:
    before = metric(gateway, "loraplex_requests_total", route="chat_completions", status="200")
    answer = client.chat.completions.create(
        model=targets.MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    assert answer.model == targets.MODEL
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    after = metric(gateway, "loraplex_requests_total", route="chat_completions", status="200")
    assert after == before + 1
    assert metric(gateway, "loraplex_tokens_total", kind="completion") > 0


def test_stream_relays_every_event_and_usage_only_when_asked(client: OpenAI) -> None:
    plain = list(
        client.completions.create(model=targets.MODEL, prompt="hi", max_tokens=8, stream=True)
    )
    assert len([c for c in plain if c.choices]) == CHUNKS
    assert all(c.usage is None for c in plain)
    with_usage = list(
        client.completions.create(
            model=targets.MODEL,
            prompt="hi",
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert with_usage[-1].usage is not None and with_usage[-1].choices == []


def test_errors_have_openai_shapes(gateway: targets.Running, client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)
    assert missing.value.code == "model_not_found"
    stranger = OpenAI(base_url=gateway.url + "/v1", api_key="lx-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.completions.create(model=targets.MODEL, prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=targets.MODEL, prompt="hi", max_tokens=4, n=99)
    assert bad.value.param == "n"
    raw = httpx.post(gateway.url + "/v1/completions", content=b"{not json", timeout=10)
    assert raw.status_code == 401  # the key is checked before the body is read
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_a_client_leaving_mid_stream_ends_the_engine_request(gateway: targets.Running) -> None:
    """The gateway stops relaying (and closes the engine request) when the client goes away."""
    before = metric(gateway, "loraplex_requests_total", status="client_disconnected")
    body = {"model": targets.MODEL, "prompt": "hi", "max_tokens": 8, "stream": True}
    headers = {"authorization": f"Bearer {gateway.api_key}"}
    with httpx.stream(
        "POST", gateway.url + "/v1/completions", json=body, headers=headers, timeout=10
    ) as response:
        assert response.status_code == 200
        next(response.iter_raw())  # the first event arrived; now leave
    deadline = time.monotonic() + CHUNKS * CHUNK_MS / 1000 * 3
    while time.monotonic() < deadline:
        if metric(gateway, "loraplex_requests_total", status="client_disconnected") > before:
            break
        time.sleep(0.05)
    assert metric(gateway, "loraplex_requests_total", status="client_disconnected") == before + 1
