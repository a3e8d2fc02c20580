"""Narrow unit tests of the gateway's own logic (no engine; loopback sockets at most)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.responses import Response

import router
from server.config import Settings
from server.errors import APIError, model_not_found
from server.gateway.accounting import estimate_tokens
from server.gateway.engine_client import (
    EngineDisconnected,
    EnginePool,
    EngineReadTimeout,
    EngineUnreachable,
)
from server.gateway.forwarding import Forwarder
from server.gateway.inference import check_bounds
from server.gateway.loops import LOOP_LAG_INTERVAL, LOOP_STALL_WARNING, watch_loop_lag
from server.gateway.metrics import Metrics
from server.gateway.openai_routes import as_response
from server.gateway.proxy import Answer, Outcome, _filter_events, classify
from server.gateway.replicas import SUPERVISED_HEALTH, Engine, Replicas
from server.gateway.transport import JoinedWrites


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


def test_outcome_settles_once_whichever_path_finishes_it() -> None:
    calls: list[int] = []
    outcome = Outcome(on_finish=[lambda o: calls.append(o.status)])
    outcome.status = 200
    outcome.finish()
    outcome.finish()
    assert calls == [200]


# -- the engine hop's own HTTP client, against scripted loopback servers ----------


OK_BODY = b'{"model":"lx-1","usage":{"prompt_tokens":1,"completion_tokens":2}}'
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(OK_BODY),
    OK_BODY,
)


class Scripted:
    """A loopback HTTP server whose every request gets ``answer(writer)``; counts connections."""

    def __init__(self, answer: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Engine:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return Engine(f"http://127.0.0.1:{port}")

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                await self.answer(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def answer_ok(writer: asyncio.StreamWriter) -> None:
    writer.write(OK)


async def test_pool_keeps_one_connection_alive_and_sends_one_request_each() -> None:
    scripted = Scripted(answer_ok)
    pool = EnginePool(connect_timeout=2, read_timeout=2)
    async with scripted as engine:
        for _ in range(3):
            response = await pool.post(engine, "/v1/completions", b'{"a":1}', "secret")
            assert response.status == 200
            assert await response.read() == OK_BODY
            response.release()
    pool.close()
    assert scripted.connections == 1
    head, _, body = scripted.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert b"authorization: Bearer secret" in head and b"content-length: 7" in head
    assert body == b'{"a":1}'


async def test_pool_resends_on_a_new_connection_when_the_engine_closed_an_idle_one() -> None:
    async def answer_then_hang_up(writer: asyncio.StreamWriter) -> None:
        writer.write(OK)  # keep-alive by HTTP/1.1 default, yet closed: an engine's idle timeout
        await writer.drain()
        writer.close()

    scripted = Scripted(answer_then_hang_up)
    pool = EnginePool(connect_timeout=2, read_timeout=2)
    async with scripted as engine:
        for _ in range(3):
            response = await pool.post(engine, "/v1/completions", b"{}", "k")
            assert await response.read() == OK_BODY
            response.release()
            await asyncio.sleep(0.05)  # the close reaches the pool's idle connection
    pool.close()
    assert scripted.connections == 3
    assert len(scripted.requests) == 3


async def test_refused_connection_is_unreachable_and_a_503() -> None:
    scripted = Scripted(answer_ok)
    async with scripted as engine:
        pass  # closed: its port now refuses connections
    with pytest.raises(EngineUnreachable) as info:
        await EnginePool(connect_timeout=2, read_timeout=2).post(
            engine, "/v1/completions", b"{}", "k"
        )
    failure = classify(info.value)
    assert (failure.status, failure.reason) == (503, "engine_unavailable")


async def test_silent_engine_is_a_read_timeout_and_a_504() -> None:
    async def never(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    pool = EnginePool(connect_timeout=2, read_timeout=0.2)
    async with Scripted(never) as engine:
        with pytest.raises(EngineReadTimeout) as info:
            await pool.post(engine, "/v1/completions", b"{}", "k")
    failure = classify(info.value)
    assert (failure.status, failure.reason) == (504, "engine_timeout")


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_streamed_chunks_arrive_one_by_one_not_buffered() -> None:
    second = asyncio.Event()

    async def stream(writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
        await second.wait()  # the second event is sent only once the first was read
        writer.write(chunk(b"data: 2\n\n") + b"0\r\n\r\n")

    pool = EnginePool(connect_timeout=2, read_timeout=2)
    async with Scripted(stream) as engine:
        response = await pool.post(engine, "/v1/completions", b"{}", "k")
        seen = []
        async for data in response.content.iter_any():
            seen.append(data)
            second.set()
        response.release()
    pool.close()
    assert seen == [b"data: 1\n\n", b"data: 2\n\n"]


async def test_engine_hanging_up_mid_stream_is_an_error_not_an_end() -> None:
    async def cut(writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
        await writer.drain()
        writer.close()

    pool = EnginePool(connect_timeout=2, read_timeout=2)
    async with Scripted(cut) as engine:
        response = await pool.post(engine, "/v1/completions", b"{}", "k")
        with pytest.raises(EngineDisconnected) as info:
            async for _ in response.content.iter_any():
                pass
        response.release()
    assert classify(info.value).status == 502


async def test_an_answer_without_length_ends_with_the_connection() -> None:
    async def unframed(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n" + OK_BODY)
        await writer.drain()
        writer.close()

    pool = EnginePool(connect_timeout=2, read_timeout=2)
    async with Scripted(unframed) as engine:
        response = await pool.post(engine, "/v1/completions", b"{}", "k")
        assert await response.read() == OK_BODY
        response.release()


class RecordingTransport:
    """Records what reaches the socket layer, to count system-call writes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"extra {name}"


async def test_joined_writes_send_two_writes_at_once_and_a_lone_one_next_turn() -> None:
    raw = RecordingTransport()
    joined = JoinedWrites(raw)  # type: ignore[arg-type]
    joined.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert raw.writes == []
    joined.write(b"body")  # the answer is whole: it leaves now, in one call
    assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    joined.write(b"event")
    assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    await asyncio.sleep(0)  # a write with no successor waits one loop turn at most
    assert raw.writes[-1] == b"event"
    joined.write(b"last")
    joined.close()
    assert raw.writes[-1] == b"last" and raw.closed
    assert joined.get_extra_info("peername") == "extra peername"


def test_metric_children_are_made_once() -> None:
    metrics = Metrics()
    first = metrics.requests_of("completions", "acme", "", "", "200")
    assert metrics.requests_of("completions", "acme", "", "", "200") is first
    first.inc()
    labels = {"route": "completions", "tenant": "acme", "adapter": "", "version": ""}
    value = metrics.registry.get_sample_value(
        "loraplex_requests_total", {**labels, "status": "200"}
    )
    assert value == 1


def test_hot_path_replies_also_serve_as_fastapi_responses() -> None:
    """The FastAPI routes (docs, mounted apps) answer with the same replies as the hot path."""
    app = FastAPI()

    @app.post("/answer")
    async def answer() -> Response:
        return as_response(Answer(200, b'{"ok":true}', [(b"x-loraplex-route", b"canary")]))

    response = TestClient(app).post("/answer")
    assert response.status_code == 200
    assert response.json() == {"ok": True}
    assert response.headers["x-loraplex-route"] == "canary"
    assert response.headers["content-length"] == "11"


async def test_loop_lag_is_measured_and_a_busy_loop_is_logged_with_its_cpu_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    watcher = asyncio.ensure_future(watch_loop_lag(metrics))
    await asyncio.sleep(LOOP_LAG_INTERVAL * 0.5)
    busy_until = time.thread_time() + LOOP_STALL_WARNING + LOOP_LAG_INTERVAL
    while time.thread_time() < busy_until:  # CPU-bound code on the loop
        pass
    await asyncio.sleep(LOOP_LAG_INTERVAL * 2)
    watcher.cancel()
    count = metrics.registry.get_sample_value("loraplex_event_loop_lag_seconds_count")
    stalled = metrics.registry.get_sample_value(
        "loraplex_event_loop_lag_seconds_bucket", {"le": "0.1"}
    )
    assert count is not None and count >= 2
    assert stalled is not None and stalled < count  # the stall landed above 0.1 s
    [warning] = [r.getMessage() for r in caplog.records if "event loop stalled" in r.getMessage()]
    used = int(re.findall(r"used (\d+) ms of CPU", warning)[0])
    assert used >= LOOP_STALL_WARNING * 1000  # told apart from a wait for a CPU or the GIL


# -- replica health: one state machine per engine, fed by probes and the forwarder -------


async def test_an_engine_no_request_reaches_is_ejected_and_the_next_one_answers() -> None:
    metrics = Metrics()
    forwarder = Forwarder(Settings(engine_api_key="k"), metrics)
    async with Scripted(answer_ok) as gone:
        pass  # closed: its port now refuses connections
    async with Scripted(answer_ok) as alive, forwarder.connected():
        for engine in (gone, alive):
            engine.report_probe(True)
            engine.report_probe(True)
        assert gone.healthy and alive.healthy
        upstream, engine = await forwarder.open([gone, alive], "/v1/completions", {"a": 1})
        assert engine is alive and upstream.status == 200
        upstream.release()
    assert not gone.healthy  # ejected by one failed send, not after eject_after probes
    errors = metrics.registry.get_sample_value(
        "loraplex_upstream_errors_total", {"engine": gone.name, "reason": "engine_unavailable"}
    )
    assert errors == 1
    gone.report_probe(True)
    assert not gone.healthy  # readmission takes readmit_after good probes
    gone.report_probe(True)
    assert gone.healthy


def test_replicas_place_only_healthy_engines_of_the_requested_base() -> None:
    replicas = Replicas(router.Placer(), resident_limit=4)
    mine, other = Engine("http://127.0.0.1:1", "base-a"), Engine("http://127.0.0.1:2", "base-b")
    replicas.add(mine)
    replicas.add(other)
    with pytest.raises(router.NoReplica):
        replicas.candidates("base-a", None)  # new engines wait for their probes
    for engine in (mine, other):
        engine.report_probe(True)
        engine.report_probe(True)
    assert replicas.candidates("base-a", "lx-0123456789abcdef") == [mine]
    assert replicas.remove({mine.url}) == [mine]
    assert replicas.engines == [other] and mine.resident_limit == 4


def test_a_supervised_engine_follows_each_probe() -> None:
    engine = Engine("http://127.0.0.1:1", health_config=SUPERVISED_HEALTH)
    engine.report_probe(True)
    assert engine.healthy
    engine.report_probe(False)
    assert not engine.healthy
