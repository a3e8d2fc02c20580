"""Forwarding one OpenAI request to an engine and its answer back.

Streams pass through event by event, never buffered whole. The engine's own
usage figures are collected for metrics and billing: on streams the gateway
asks for them (``stream_options.include_usage``) and drops that final chunk
again for clients that did not ask. Engine failures become OpenAI-shaped
errors: 503 when no engine could be reached, 504 on timeout, 502 otherwise;
mid-stream, an error event that ends the stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson
import yarl
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.errors import APIError
from server.gateway.engine_client import EnginePool, EngineUnreachable
from server.gateway.replicas import Engine
from server.gateway.resolution import Route

RawHeaders = list[tuple[bytes, bytes]]
log = logging.getLogger("loraplex.gateway")


@dataclass
class TokenUsage:
    """The engine's token counts for one answer."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def of(cls, payload: Any) -> TokenUsage | None:
        if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
            return None
        usage = payload["usage"]
        return cls(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


class KeptAnswer:
    """The answer's bytes as the client got them (events too), kept for capture up to a limit."""

    __slots__ = ("chunks", "limit", "over", "size")

    def __init__(self, limit: int) -> None:
        self.chunks: list[bytes] = []
        self.limit = limit
        self.size = 0
        self.over = False
        """True once the answer outgrew ``limit``: nothing is kept from then on."""

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.over = True
            self.chunks.clear()
        elif not self.over:
            self.chunks.append(data)


@dataclass
class Outcome:
    """What happened, for the caller's metrics; filled in as the response is sent."""

    status: int = 0
    first_byte_at: float | None = None
    finished_at: float | None = None
    error: str = ""
    usage: TokenUsage | None = None
    on_finish: list[Callable[[Outcome], None]] = field(default_factory=list)
    kept: KeptAnswer | None = None
    """Where the answer's bytes go when it is to be captured (None: it is not)."""

    def finish(self) -> None:
        """Run the callbacks once (they settle limits and counters), whichever path ends first."""
        if self.finished_at is not None:
            return
        self.finished_at = time.perf_counter()
        for callback in self.on_finish:
            callback(self)


class UpstreamFailure(APIError):
    """The engine could not be used; ``reason`` labels the metric."""

    def __init__(self, status: int, message: str, reason: str, retry_after: int | None = None):
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        super().__init__(status, message, code=reason, headers=headers)
        self.reason = reason


UpstreamError = (aiohttp.ClientError, OSError)
"""What talking to an engine can raise: aiohttp's errors, the pool's, timeouts (an OSError)."""


class Upstream(Protocol):
    """An engine's answer as the proxy reads it: aiohttp's response or an ``EngineResponse``."""

    @property
    def status(self) -> int: ...

    @property
    def content(self) -> Any: ...

    async def read(self) -> bytes: ...

    def release(self) -> Any: ...

    def close(self) -> None: ...


def classify(exc: BaseException) -> UpstreamFailure:
    unreachable = aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError | EngineUnreachable
    if isinstance(exc, unreachable):
        return UpstreamFailure(
            503,
            "The model engine is not reachable right now; retry in a few seconds.",
            "engine_unavailable",
            retry_after=2,
        )
    if isinstance(exc, TimeoutError):
        return UpstreamFailure(
            504, "The model engine did not answer in time.", "engine_timeout", retry_after=1
        )
    return UpstreamFailure(
        502, f"The model engine failed while answering: {type(exc).__name__}.", "engine_error"
    )


_urls: dict[tuple[str, str], yarl.URL] = {}
"""Parsed engine URLs: aiohttp parses a string URL on every request otherwise."""


def engine_url(engine: Engine, path: str) -> yarl.URL:
    key = (engine.url, path)
    url = _urls.get(key)
    if url is None:
        if len(_urls) > 4096:  # engines come and go with discovery; never grow unbounded
            _urls.clear()
        url = _urls[key] = yarl.URL(engine.url + path)
    return url


async def send(
    client: aiohttp.ClientSession,
    pool: EnginePool | None,
    engine: Engine,
    path: str,
    body: dict[str, Any],
    engine_key: str,
) -> Upstream:
    """Open the engine request (headers received, body still streaming) or raise UpstreamFailure."""
    data = orjson.dumps(body)
    try:
        if pool is not None and pool.usable(engine):
            return await pool.post(engine, path, data, engine_key)
        return await client.post(
            engine_url(engine, path),
            data=data,
            headers={"authorization": f"Bearer {engine_key}", "content-type": "application/json"},
        )
    except UpstreamError as exc:
        raise classify(exc) from exc


async def error_from_engine(upstream: Upstream, route: Route) -> Response:
    """Relay an engine's 4xx (already OpenAI-shaped); turn its 5xx into a 502.

    Engine-side adapter names never reach clients: they are replaced by the
    name the client asked for.
    """
    try:
        content = await upstream.read()
    finally:
        upstream.release()
    content = route.hide(content)
    if 400 <= upstream.status < 500:
        try:
            payload = json.loads(content)
        except ValueError:
            payload = None
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict):
            # vLLM's errors carry "code": <HTTP status> and its own "type"; OpenAI's code is a
            # string or null, so the error is re-shaped rather than relayed byte for byte.
            code, param = error.get("code"), error.get("param")
            return APIError(
                upstream.status,
                str(error.get("message") or "request rejected by the engine"),
                code=code if isinstance(code, str) else None,
                param=param if isinstance(param, str) else None,
            ).response()
        message = content.decode(errors="replace")[:500] or "request rejected by the engine"
        return APIError(upstream.status, message).response()
    if upstream.status == 503:
        # The engine could not load the adapter right now (blob store down or slow, cache
        # disk full). Its message names cache paths and the blob store: operators get it
        # in the log, clients a plain retryable answer.
        log.warning("engine could not serve %s: %s", route.requested_model, content[:500])
        message = (
            f"The model `{route.requested_model}` cannot be loaded right now; "
            "retry in a few seconds."
        )
        return UpstreamFailure(503, message, "adapter_unavailable", retry_after=2).response()
    return UpstreamFailure(
        502, f"The model engine answered with HTTP {upstream.status}.", "engine_status"
    ).response()


class Answer:
    """A whole answer as an ASGI app: status line, headers and body in two sends, nothing else.

    Cheaper than a framework response object on the hot path: the headers are
    built once, as bytes, and no background-task or charset logic runs.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: RawHeaders) -> None:
        self.status = status
        self.body = body
        self.headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            *headers,
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


async def complete(upstream: Upstream, route: Route, outcome: Outcome) -> Answer:
    """A non-streaming answer: read it whole, echo the requested model name, note usage.

    The body is parsed only to check it and read its usage; the engine's bytes
    are relayed, with the engine-side name replaced, instead of re-encoded.
    """
    try:
        content = await upstream.read()
    finally:
        upstream.release()
    outcome.first_byte_at = time.perf_counter()
    payload = orjson.loads(content)
    outcome.usage = TokenUsage.of(payload)
    outcome.status = 200
    content = route.hide(content)
    if outcome.kept is not None:
        outcome.kept.add(content)
    outcome.finish()
    return Answer(200, content, route.headers())


def stream(upstream: Upstream, route: Route, outcome: Outcome, keep_usage_chunk: bool) -> Relay:
    outcome.status = 200
    return Relay(upstream, route, outcome, keep_usage_chunk)


class Relay:
    """A streamed answer as an ASGI app: engine events relayed as they arrive.

    If the client goes away, the engine connection is closed at once (vLLM
    then aborts the generation) instead of reading the stream to its end.
    """

    def __init__(
        self, upstream: Upstream, route: Route, outcome: Outcome, keep_usage_chunk: bool
    ) -> None:
        self.upstream = upstream
        self.route = route
        self.outcome = outcome
        self.keep_usage_chunk = keep_usage_chunk
        self.client_gone = False
        self.headers: RawHeaders = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            *route.headers(),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(self._watch(receive))
        events = self.events()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async for chunk in events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            await events.aclose()  # releases the engine connection and settles the request

    async def _watch(self, receive: Receive) -> None:
        """Wait for the client to disconnect, then stop the engine's generation."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.client_gone = True
        self.upstream.close()

    async def events(self) -> AsyncGenerator[bytes, None]:
        outcome = self.outcome
        hide = self.route.hide
        kept = outcome.kept
        buffer = b""
        done = False
        """Whether the answer's last event, ``[DONE]``, has been relayed: the official
        client closes the connection as soon as it reads it, often before the engine's
        own end of stream arrives, and a whole answer is no failed request."""
        try:
            async for chunk in self.upstream.content.iter_any():
                buffer += chunk
                # Relay whole SSE events only, so an event is never split mid-rewrite.
                cut = buffer.rfind(b"\n\n")
                if cut < 0:
                    continue
                events, buffer = buffer[: cut + 2], buffer[cut + 2 :]
                out = _filter_events(events, outcome, self.keep_usage_chunk)
                if out:
                    if outcome.first_byte_at is None:
                        outcome.first_byte_at = time.perf_counter()
                    out = hide(out)
                    if kept is not None:
                        kept.add(out)
                    done = done or _DONE in out
                    yield out
            if buffer.strip():
                yield hide(buffer)
        except UpstreamError as exc:
            if self.client_gone:
                if not done:
                    outcome.error = "client_disconnected"
                return
            failure = classify(exc)
            outcome.error = failure.reason
            yield b"data: " + json.dumps(failure.body()).encode() + b"\n\n"
        finally:
            self.upstream.release()
            outcome.finish()


_DONE = b"data: [DONE]"
# Only a chunk carrying a usage object is parsed; the rest pass as bytes.
_USAGE = re.compile(rb'"usage":\s*\{')


def _filter_events(events: bytes, outcome: Outcome, keep_usage_chunk: bool) -> bytes:
    """Note the usage chunk's figures; drop it unless the client asked for it."""
    if not _USAGE.search(events):
        return events
    kept = []
    for event in events.split(b"\n\n"):
        if event.startswith(b"data: ") and _USAGE.search(event):
            try:
                payload = orjson.loads(event[6:])
            except ValueError:
                payload = None
            usage = TokenUsage.of(payload)
            if usage is not None:
                outcome.usage = usage
                if not keep_usage_chunk and payload.get("choices") == []:
                    continue
        kept.append(event)
    return b"\n\n".join(kept)
