"""Narrow unit tests of the gateway's own logic (no engine, no network)."""

from __future__ import annotations

import asyncio
import json

import pytest

from server.errors import APIError, model_not_found
from server.inference import check_bounds, estimate_tokens
from server.proxy import Outcome, Target, _filter_events, _renamer
from server.tenancy import TTLCache


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "model"),
        ({"model": ""}, "model"),
        ({"model": "m", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "max_tokens": True}, "max_tokens"),
        ({"model": "m", "max_completion_tokens": 10_000}, "max_completion_tokens"),
        ({"model": "m", "n": 17}, "n"),
        ({"model": "m", "stream": "yes"}, "stream"),
        ({"model": "m", "stream_options": []}, "stream_options"),
        ({"model": "m", "user": 5}, "user"),
    ],
)
def test_bounds_refuse_with_the_parameter_named(body: dict[str, object], param: str) -> None:
    with pytest.raises(APIError) as info:
        check_bounds(body, max_tokens_limit=4096)
    assert info.value.status == 400
    assert info.value.param == param


def test_bounds_accept_a_normal_request() -> None:
    check_bounds({"model": "m", "max_tokens": 4096, "n": 2, "stream": True}, 4096)


def test_not_found_body_depends_only_on_the_name() -> None:
    assert model_not_found("x").body() == model_not_found("x").body()
    assert model_not_found("x").body()["error"]["code"] == "model_not_found"


def test_token_estimate_counts_prompt_and_all_completions() -> None:
    body = {"prompt": "a" * 30, "max_tokens": 10, "n": 2}
    assert estimate_tokens(body, 4096) == 10 + 20


def test_usage_chunk_is_noted_and_dropped_unless_asked() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2}
    events = (
        b'data: {"choices":[{"text":"a"}],"model":"m"}\n\n'
        + b"data: "
        + json.dumps({"choices": [], "usage": usage}).encode()
        + b"\n\ndata: [DONE]\n\n"
    )
    outcome = Outcome()
    kept = _filter_events(events, outcome, keep_usage_chunk=False)
    assert b"usage" not in kept and b"[DONE]" in kept
    assert outcome.usage is not None and outcome.usage.completion_tokens == 2
    assert _filter_events(events, Outcome(), keep_usage_chunk=True) == events


def test_engine_names_are_replaced_by_the_requested_name() -> None:
    rename = _renamer(Target("mine@2", "lx-0123456789abcdef"))
    assert rename(b'{"model":"lx-0123456789abcdef"}') == b'{"model":"mine@2"}'


def test_ttl_cache_reloads_after_expiry() -> None:
    calls = 0

    async def load() -> int:
        nonlocal calls
        calls += 1
        return calls

    async def scenario() -> list[int]:
        cache: TTLCache[int] = TTLCache(ttl=0.05)
        first = [await cache.get("k", load), await cache.get("k", load)]
        await asyncio.sleep(0.06)
        return [*first, await cache.get("k", load)]

    assert asyncio.run(scenario()) == [1, 1, 2]


def test_outcome_settles_once_whichever_path_finishes_it() -> None:
    calls: list[int] = []
    outcome = Outcome(on_finish=[lambda o: calls.append(o.status)])
    outcome.status = 200
    outcome.finish()
    outcome.finish()
    assert calls == [200]


def test_ttl_cache_shares_one_load_among_concurrent_misses() -> None:
    calls = 0

    async def load() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return 7

    async def scenario() -> list[int]:
        cache: TTLCache[int] = TTLCache(ttl=10)
        return list(await asyncio.gather(*(cache.get("k", load) for _ in range(20))))

    assert asyncio.run(scenario()) == [7] * 20
    assert calls == 1


def test_ttl_cache_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    async def boom() -> int:
        await asyncio.sleep(0.01)
        raise RuntimeError("db down")

    async def ok() -> int:
        return 1

    async def scenario() -> tuple[list[object], int]:
        cache: TTLCache[int] = TTLCache(ttl=10)
        results = await asyncio.gather(
            *(cache.get("k", boom) for _ in range(3)), return_exceptions=True
        )
        return list(results), await cache.get("k", ok)

    results, after = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) for r in results)
    assert after == 1
