"""The gateway through the official `openai` client, on the real vLLM CPU engine."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from registry import ADMIN_SCOPE, Registry
from tests.e2e.conftest import OPERATOR, TenantKeys
from tests.e2e.serving import ServeProcess, free_port, metric_samples, shared_registry_env

CHAT = [{"role": "user", "content": "What color is the sky?"}]


def test_models_lists_the_base(client: OpenAI, base_name: str) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [base_name]


def test_chat_completion(client: OpenAI, base_name: str) -> None:
    reply = client.chat.completions.create(
        model=base_name, messages=CHAT, max_tokens=16, temperature=0
    )
    assert reply.model == base_name
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_completion_is_greedy_deterministic(client: OpenAI, base_name: str) -> None:
    texts = [
        client.completions.create(
            model=base_name, prompt="The cat sat on the", max_tokens=8, temperature=0
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert texts[0] and texts[0] == texts[1]


def test_streaming_chat_matches_non_streaming(client: OpenAI, base_name: str) -> None:
    whole = client.chat.completions.create(
        model=base_name, messages=CHAT, max_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=base_name, messages=CHAT, max_tokens=12, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert all(c.model == base_name for c in chunks)
    # The gateway asks the engine for usage, but a client that did not ask gets no usage chunk.
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_streaming_usage_when_asked(client: OpenAI, base_name: str) -> None:
    chunks = list(
        client.completions.create(
            model=base_name,
            prompt="Once upon a time",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_chat_streaming_usage_when_asked(client: OpenAI, base_name: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model=base_name,
            messages=CHAT,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []  # OpenAI's last, usage-only chunk
    generated = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert 0 < usage.completion_tokens <= 6 and generated
    assert all(c.usage is None for c in chunks[:-1])


def test_unknown_model_is_a_404_model_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=4)
    assert info.value.code == "model_not_found"


def test_max_tokens_over_the_limit_is_refused(client: OpenAI, base_name: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=base_name, prompt="hi", max_tokens=10**6)
    assert info.value.code == "max_tokens_exceeded"


def test_engine_validation_errors_pass_through(client: OpenAI, base_name: str) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=base_name, prompt="hi", max_tokens=4, temperature=-3)


@pytest.mark.parametrize(
    ("content", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"model": 5}', 400, "`model`"),
        (b'{"model": "x", "n": 99}', 400, "`n`"),
        (b'{"model": "x", "pad": "' + b"a" * (2 << 20) + b'"}', 413, "limit"),
    ],
)
def test_bad_bodies_get_openai_shaped_errors(
    gateway: ServeProcess, acme: TenantKeys, content: bytes, status: int, fragment: str
) -> None:
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", "authorization": f"Bearer {acme.key}"},
        timeout=30,
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_metrics_count_requests_and_tokens(
    client: OpenAI, gateway: ServeProcess, base_name: str
) -> None:
    client.completions.create(model=base_name, prompt="A dog", max_tokens=5, temperature=0)
    requests = metric_samples(gateway.url, "loraplex_requests_total")
    assert any(
        labels["route"] == "completions" and labels["status"] == "200" and value >= 1
        for labels, value in requests
    )
    tokens = metric_samples(gateway.url, "loraplex_tokens_total")
    assert sum(value for labels, value in tokens if labels["kind"] == "completion") >= 5
    assert metric_samples(gateway.url, "loraplex_request_duration_seconds_count")
    assert [v for _, v in metric_samples(gateway.url, "loraplex_engine_up")] == [1.0]


def test_unreachable_engine_gives_503(
    tmp_path: Path, base_name: str, gateway: ServeProcess, acme: TenantKeys
) -> None:
    serve = ServeProcess(
        tmp_path,
        args=["--engine-urls", f"http://127.0.0.1:{free_port()}", "--served-model-name", base_name],
        env=shared_registry_env(gateway),
    ).start()
    try:
        deadline_client = OpenAI(base_url=serve.url + "/v1", api_key=acme.key, max_retries=0)
        _wait_listening(serve)
        with pytest.raises(openai.InternalServerError) as info:
            deadline_client.completions.create(model=base_name, prompt="hi", max_tokens=2)
        assert info.value.status_code == 503
        assert info.value.response.headers.get("retry-after")
        assert httpx.get(serve.url + "/readyz").status_code == 503
    finally:
        assert serve.stop()


def test_gateway_can_use_an_engine_it_did_not_start(
    tmp_path: Path,
    base_name: str,
    engine_port: int,
    engine_key: str,
    gateway: ServeProcess,
    acme: TenantKeys,
) -> None:
    serve = ServeProcess(
        tmp_path,
        args=[
            "--engine-urls",
            f"http://127.0.0.1:{engine_port}",
            "--served-model-name",
            base_name,
        ],
        env={"LORAPLEX_ENGINE_API_KEY": engine_key, **shared_registry_env(gateway)},
    ).start()
    try:
        serve.wait_ready(timeout=60)
        other = OpenAI(base_url=serve.url + "/v1", api_key=acme.key, max_retries=0)
        reply = other.completions.create(model=base_name, prompt="The sun", max_tokens=4)
        assert reply.choices[0].text
        assert serve.engine_processes() == []  # it started none
    finally:
        assert serve.stop()


def test_missing_bad_and_admin_keys_are_refused(
    gateway: ServeProcess, registry: Registry, base_name: str
) -> None:
    _, admin_key = registry.create_api_key(None, ADMIN_SCOPE, OPERATOR)
    for key, status, code in [
        (None, 401, "invalid_api_key"),
        ("lpx-not-a-key", 401, "invalid_api_key"),
        (admin_key, 403, "admin_key_not_allowed"),
    ]:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        response = httpx.post(
            gateway.url + "/v1/completions",
            json={"model": base_name, "prompt": "hi", "max_tokens": 2},
            headers=headers,
        )
        assert response.status_code == status
        assert response.json()["error"]["code"] == code


def _wait_listening(serve: ServeProcess) -> None:
    for _ in range(120):
        try:
            httpx.get(serve.url + "/healthz", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.25)
    raise AssertionError(serve.log_tail())
