"""256 concurrent streaming clients through the gateway to the real vLLM engine.

Every stream must end with ``data: [DONE]`` and carry no error event; nothing
may fail. Timings are printed, not asserted.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import pytest
from openai import AsyncOpenAI

from registry import Registry
from tests import reliability
from tests.e2e.conftest import make_tenant
from tests.e2e.serving import ServeProcess

STREAMS = 256
MAX_TOKENS = 8


@dataclass(frozen=True)
class StreamResult:
    done: bool
    """The stream ended with ``data: [DONE]``."""
    chunks: int
    """Data events carrying completion choices (vLLM may put several tokens in one)."""
    tokens: int
    """Completion tokens, from the stream's final usage chunk."""
    error: str | None
    """An error event's or exception's text, if any."""


async def one_stream(client: AsyncOpenAI, model: str, index: int) -> StreamResult:
    chunks, tokens, done, error = 0, 0, False, None
    try:
        async with client.completions.with_streaming_response.create(
            model=model,
            prompt=f"Story {index}:",
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        ) as response:
            async for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    error = json.dumps(event["error"])[:300]
                elif event.get("choices"):
                    chunks += 1
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    return StreamResult(done, chunks, tokens, error)


async def run_streams(url: str, key: str, model: str) -> tuple[list[StreamResult], float]:
    client = AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)
    started = time.perf_counter()
    try:
        results = await asyncio.gather(*(one_stream(client, model, i) for i in range(STREAMS)))
    finally:
        await client.close()
    return list(results), time.perf_counter() - started


@pytest.mark.reliability
def test_256_concurrent_streams_all_end_with_done(
    gateway: ServeProcess,
    registry: Registry,
    base_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tenant = make_tenant(registry, "streamer")
    results, seconds = asyncio.run(run_streams(gateway.url, tenant.key, base_name))
    failed = [r for r in results if not r.done or r.error or r.tokens != MAX_TOKENS]
    reliability.record(
        "load",
        f"{STREAMS} concurrent streaming clients through the gateway (real vLLM)",
        len(results),
        "streams",
        len(failed),
        "failed streams",
    )
    with capsys.disabled():
        print(
            f"\n[256 streams] {len(results)} streams of {MAX_TOKENS} tokens in {seconds:.1f} s; "
            f"{len(failed)} failed"
        )
    assert len(results) == STREAMS
    assert failed == [], failed[:5]
    # ignore_eos: every stream really generated its tokens, not just an empty [DONE].
    assert all(r.tokens == MAX_TOKENS for r in results), {r.tokens for r in results}
