"""The usage book's online counters (server/gateway/tenancy.py ``UsageBook``, booked by
server/gateway/accounting.py ``Accounting.finished``): every admitted request is booked
once, with or without usage; server-side failures count as errors and the answered ones'
latency is summed and bucketed; all of it reaches the registry with the usage flush.

The registry is a real one on SQLite; the engine's answers are the narrow fake of
test_name_hiding (``FakeUpstream``): these tests are about what the gateway counts.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

import router
from registry import Actor, LocalBlobStore, Principal, Registry, latency
from server.gateway import proxy
from server.gateway.accounting import CHAT, Accounting
from server.gateway.metrics import Metrics
from server.gateway.tenancy import Caller, UsageBook
from tests.server.gateway.test_name_hiding import LORA, ROUTE, FakeUpstream, run_asgi

ADMIN = Actor("test-admin", admin=True)
BODY = {"model": "support@2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
TOOK = 0.3
"""Seconds each request is made to have taken (its start is set this far back)."""
USAGE = {"prompt_tokens": 5, "completion_tokens": 2}

Run = Callable[[proxy.Outcome], Awaitable[None]]


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "blobs"))


@pytest.fixture
def caller(registry: Registry) -> Caller:
    tenant_id = registry.create_tenant("acme", ADMIN).id
    assert tenant_id is not None
    return Caller(Principal(tenant_id, "tenant", 1), tenant_id, "acme")


class _Broken:
    """A stream body that sends one event, then the engine drops the connection."""

    async def iter_any(self) -> AsyncIterator[bytes]:
        yield b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
        raise aiohttp.ClientPayloadError("connection lost")


async def _whole(outcome: proxy.Outcome) -> None:
    body = json.dumps({"model": LORA, "choices": [], "usage": USAGE}).encode()
    await run_asgi(await proxy.complete(FakeUpstream(200, body), ROUTE, outcome))


async def _streamed(outcome: proxy.Outcome) -> None:
    events = [
        b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n',
        b'data: {"choices": [], "usage": ' + json.dumps(USAGE).encode() + b"}\n\n",
        b"data: [DONE]\n\n",
    ]
    await run_asgi(proxy.stream(FakeUpstream(200, *events), ROUTE, outcome, False))


async def _broken_stream(outcome: proxy.Outcome) -> None:
    upstream = FakeUpstream(200)
    upstream.content = _Broken()  # type: ignore[assignment]
    await run_asgi(proxy.stream(upstream, ROUTE, outcome, False))


def _ended(status: int, error: str = "") -> Run:
    """A request that ends as the hot path ends it without an answer from the engine body
    (``Inference.handle``: an engine's error status, or a failure before it answered)."""

    async def run(outcome: proxy.Outcome) -> None:
        outcome.status, outcome.error = status, error
        outcome.finish()

    return run


async def _book(accounting: Accounting, caller: Caller, run: Run) -> None:
    admission = await accounting.admit(caller, router.TenantLimits(), dict(BODY))
    started = time.perf_counter() - TOOK
    outcome = proxy.Outcome()
    outcome.on_finish.append(
        lambda o: accounting.finished(CHAT, ROUTE, caller, admission, o, started)
    )
    await run(outcome)


async def test_every_request_is_booked_once_with_its_errors_and_latency(
    registry: Registry, caller: Caller
) -> None:
    book = UsageBook(registry)
    accounting = Accounting(router.Limiter(), book, Metrics(), 4096)
    runs = {
        "answered": _whole,
        "streamed": _streamed,
        "stream broken by the engine": _broken_stream,
        "engine refused the request (4xx)": _ended(400),
        "engine failed (5xx)": _ended(500),
        "no replica": _ended(503, "no_engine"),
        "client went away mid-stream": _ended(200, "client_disconnected"),
    }
    for run in runs.values():
        await _book(accounting, caller, run)
    await book.flush()
    [row] = registry.usage(caller.tenant_id, dt.date.min)
    assert (row.adapter, row.version) == ("support", 2)
    assert row.requests == len(runs)
    assert row.errors == 3  # the broken stream, the 5xx and the missing replica
    assert (row.prompt_tokens, row.completion_tokens) == (10, 4)
    # Latency of the two answered requests only; each took TOOK plus this test's own time.
    assert row.latency_count == 2
    assert 2 * TOOK <= row.latency_seconds < 2 * TOOK + 0.4
    assert row.latency_buckets is not None and sum(row.latency_buckets) == 2
    assert row.latency_buckets[latency.bucket(TOOK)] == 2


async def test_counters_survive_a_failed_flush_and_add_up_in_the_stored_row(
    registry: Registry, caller: Caller
) -> None:
    book = UsageBook(registry)
    book.add(caller.tenant_id, "bot", 1, 3, 1, seconds=0.07)
    book.add(caller.tenant_id, "bot", 1, 0, 0, error=True)
    real = registry.record_usage
    registry.record_usage = _failing  # type: ignore[method-assign]
    await book.flush()
    registry.record_usage = real  # type: ignore[method-assign]
    book.add(caller.tenant_id, "bot", 1, 3, 1, seconds=4.0)
    await book.flush()  # the kept counts and the new ones, in one write
    book.add(caller.tenant_id, "bot", 1, 3, 1, seconds=0.07)
    await book.flush()  # into the same day's row: its buckets are added to
    [row] = registry.usage(caller.tenant_id, dt.date.min)
    assert (row.requests, row.errors, row.latency_count) == (4, 1, 3)
    assert row.latency_seconds == pytest.approx(4.14)
    expected = [0] * latency.SIZE
    expected[latency.bucket(0.07)] = 2
    expected[latency.bucket(4.0)] = 1
    assert row.latency_buckets == expected


def _failing(*args: object, **kwargs: object) -> None:
    raise OSError("database is down")
