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
import socket
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import aiohttp
import yarl
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.engine import Engine
from server.errors import APIError

try:
    import httptools
except ImportError:  # uvicorn's optional parser; without it every engine hop uses aiohttp
    httptools = None  # type: ignore[assignment]

RawHeaders = list[tuple[bytes, bytes]]
log = logging.getLogger("loraplex.gateway")

_encode = json.JSONEncoder(separators=(",", ":")).encode
"""Compact JSON; one encoder reused (``json.dumps`` with options builds one per call)."""


@dataclass
class Target:
    """What a request resolved to: the engine-side model name and labels for metrics."""

    requested_model: str
    """The ``model`` string the client sent; responses echo it."""

    engine_model: str
    """The name the engine knows: the base's served name or an adapter's ``lx-...`` name."""

    tenant: str = ""
    adapter: str = ""
    version: str = ""
    label: str = ""
    """How the version was chosen: production, canary, pinned or an alias name."""

    def headers(self) -> RawHeaders:
        """The adapter headers of an answer, as ASGI raw headers."""
        if not self.adapter:
            return []
        return [
            (b"x-loraplex-adapter", self.adapter.encode()),
            (b"x-loraplex-version", self.version.encode()),
            (b"x-loraplex-route", self.label.encode()),
        ]


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def of(cls, payload: Any) -> Usage | None:
        if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
            return None
        usage = payload["usage"]
        return cls(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


@dataclass
class Outcome:
    """What happened, for the caller's metrics; filled in as the response is sent."""

    status: int = 0
    first_byte_at: float | None = None
    finished_at: float | None = None
    error: str = ""
    usage: Usage | None = None
    on_finish: list[Callable[[Outcome], None]] = field(default_factory=list)

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


def classify(exc: BaseException, engine: Engine) -> UpstreamFailure:
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
    data = _encode(body).encode()
    try:
        if pool is not None and pool.usable(engine):
            return await pool.post(engine, path, data, engine_key)
        return await client.post(
            engine_url(engine, path),
            data=data,
            headers={"authorization": f"Bearer {engine_key}", "content-type": "application/json"},
        )
    except UpstreamError as exc:
        raise classify(exc, engine) from exc


async def error_from_engine(upstream: Upstream, target: Target) -> Response:
    """Relay an engine's 4xx (already OpenAI-shaped); turn its 5xx into a 502.

    Engine-side adapter names never reach clients: they are replaced by the
    name the client asked for.
    """
    try:
        content = await upstream.read()
    finally:
        upstream.release()
    if target.engine_model != target.requested_model:
        content = content.replace(
            target.engine_model.encode(), json.dumps(target.requested_model)[1:-1].encode()
        )
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
        log.warning("engine could not serve %s: %s", target.requested_model, content[:500])
        message = (
            f"The model `{target.requested_model}` cannot be loaded right now; "
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


async def complete(upstream: Upstream, target: Target, outcome: Outcome) -> Answer:
    """A non-streaming answer: read it whole, echo the requested model name, note usage.

    The body is parsed only to check it and read its usage; the engine's bytes
    are relayed, with the engine-side name replaced, instead of re-encoded.
    """
    try:
        content = await upstream.read()
    finally:
        upstream.release()
    outcome.first_byte_at = time.perf_counter()
    payload = json.loads(content)
    outcome.usage = Usage.of(payload)
    if target.engine_model != target.requested_model:
        content = content.replace(_quoted(target.engine_model), _quoted(target.requested_model))
    outcome.status = 200
    outcome.finish()
    return Answer(200, content, target.headers())


def _quoted(name: str) -> bytes:
    return json.dumps(name).encode()


def stream(
    upstream: Upstream,
    target: Target,
    outcome: Outcome,
    engine: Engine,
    keep_usage_chunk: bool,
) -> Relay:
    outcome.status = 200
    return Relay(upstream, target, outcome, engine, keep_usage_chunk)


class Relay:
    """A streamed answer as an ASGI app: engine events relayed as they arrive.

    If the client goes away, the engine connection is closed at once (vLLM
    then aborts the generation) instead of reading the stream to its end.
    """

    def __init__(
        self,
        upstream: Upstream,
        target: Target,
        outcome: Outcome,
        engine: Engine,
        keep_usage_chunk: bool,
    ) -> None:
        self.upstream = upstream
        self.target = target
        self.outcome = outcome
        self.engine = engine
        self.keep_usage_chunk = keep_usage_chunk
        self.client_gone = False
        self.headers: RawHeaders = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            *target.headers(),
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
        rename = _renamer(self.target)
        buffer = b""
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
                    yield rename(out)
            if buffer.strip():
                yield rename(buffer)
        except UpstreamError as exc:
            if self.client_gone:
                outcome.error = "client_disconnected"
                return
            failure = classify(exc, self.engine)
            outcome.error = failure.reason
            yield b"data: " + json.dumps(failure.body()).encode() + b"\n\n"
        finally:
            self.upstream.release()
            outcome.finish()


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
                payload = json.loads(event[6:])
            except ValueError:
                payload = None
            usage = Usage.of(payload)
            if usage is not None:
                outcome.usage = usage
                if not keep_usage_chunk and payload.get("choices") == []:
                    continue
        kept.append(event)
    return b"\n\n".join(kept)


def _renamer(target: Target) -> Callable[[bytes], bytes]:
    """Replace the engine-side model name by the requested one in relayed events."""
    if target.engine_model == target.requested_model:
        return lambda data: data
    old = b'"model":' + json.dumps(target.engine_model).encode()
    new = b'"model":' + json.dumps(target.requested_model).encode()
    return lambda data: data.replace(old, new)


# -- the engine hop --------------------------------------------------------
#
# The hot path's own HTTP/1.1 client: keep-alive connections, one write per
# request, answers parsed by httptools (uvicorn's parser). aiohttp cost about a
# third of the gateway's CPU per proxied request in the profile; this costs a
# fraction of that. Plain-http engines only: https engines use aiohttp.


class EngineUnreachable(ConnectionError):
    """No connection to the engine could be made (refused, unroutable or timed out)."""


class EngineDisconnected(ConnectionError):
    """The engine connection closed, or carried malformed HTTP, before the answer ended."""


class EngineReadTimeout(TimeoutError):
    """The engine sent nothing for the read timeout."""


_PAUSE_ABOVE = 1 << 20
"""Bytes of an answer buffered before reading from the engine pauses (a slow client)."""


class EngineResponse:
    """An engine's answer: the status once headers arrive, then the body as it comes.

    The subset of ``aiohttp.ClientResponse`` the proxy uses: ``status``,
    ``read()``, ``content.iter_any()``, ``release()`` and ``close()``.
    """

    def __init__(self, connection: _Connection, read_timeout: float) -> None:
        self.status = 0
        self.content = self  # aiohttp's spelling: `upstream.content.iter_any()`
        self.complete = False
        self._connection = connection
        self._read_timeout = read_timeout
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False

    # -- fed by the connection --
    def started(self, status: int) -> None:
        self.status = status
        self._wake()

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _PAUSE_ABOVE and not self._paused:
            self._paused = True
            self._connection.pause_reading()
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self._error is None and not self.complete:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        """Until the connection has news, or the read timeout passes with none."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self._read_timeout, self._expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(EngineReadTimeout(f"no data for {self._read_timeout:g}s"))

    # -- read by the proxy --
    async def headers(self) -> None:
        while not self.status:
            if self._error is not None:
                raise self._error
            await self._wait()

    def _take(self) -> bytes:
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = []
        self._buffered = 0
        if self._paused:
            self._paused = False
            self._connection.resume_reading()
        return data

    async def iter_any(self) -> AsyncGenerator[bytes, None]:
        """Body bytes as they arrive (whatever was buffered, joined)."""
        while True:
            if self._chunks:
                yield self._take()
            elif self._error is not None:
                raise self._error
            elif self.complete:
                return
            else:
                await self._wait()

    async def read(self) -> bytes:
        parts = [chunk async for chunk in self.iter_any()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool if it is reusable."""
        if self._released:
            return
        self._released = True
        self._connection.done(reusable=self.complete and self._error is None)

    def close(self) -> None:
        """Abandon the answer: the connection is closed (vLLM then aborts the generation)."""
        self.fail(EngineDisconnected("the answer was abandoned"))
        if not self._released:
            self._released = True
            self._connection.done(reusable=False)


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to an engine."""

    def __init__(self, pool: EnginePool, origin: str) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: EngineResponse | None = None
        self.closed = False
        self.received = False
        """Whether any byte of the current answer arrived."""
        self.keep_alive = False
        self.framed = False
        """Whether the current answer has a length or chunks (else it ends at the close)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # answers must not wait for Nagle's algorithm
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes nobody asked for: this connection is not reusable
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.response.fail(EngineDisconnected(f"malformed HTTP from the engine: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        response = self.response
        if response is None:
            return
        if response.status and not self.framed and exc is None:
            response.finish()  # no length, not chunked: the body ends with the connection
        else:
            response.fail(EngineDisconnected("the engine closed the connection"))

    # httptools callbacks
    def on_header(self, name: bytes, _: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        # Only valid inside the parser's callbacks, so noted here for `done`.
        self.keep_alive = self.parser.should_keep_alive()
        if self.response is not None:
            self.response.started(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response.feed(body)

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response.finish()

    def send(self, request: bytes, read_timeout: float) -> EngineResponse:
        assert self.transport is not None
        self.received = False
        self.framed = False
        self.response = EngineResponse(self, read_timeout)
        self.transport.write(request)
        return self.response

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def done(self, reusable: bool) -> None:
        self.response = None
        if reusable and not self.closed and self.keep_alive:
            self.pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class EnginePool:
    """Keep-alive connections per engine, and the requests sent over them."""

    MAX_IDLE = 256
    """Idle connections kept per engine; more are closed when released."""

    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[str, list[_Connection]] = {}
        self._heads: dict[tuple[str, str, str], bytes] = {}

    @staticmethod
    def usable(engine: Engine) -> bool:
        return httptools is not None and engine.url.startswith("http://")

    async def post(self, engine: Engine, path: str, body: bytes, engine_key: str) -> EngineResponse:
        """Send the request; return once the answer's headers arrived."""
        request = self._head(engine.url, path, engine_key) + b"%d\r\n\r\n" % len(body) + body
        connection = self._idle_connection(engine.url)
        if connection is not None:
            try:
                return await self._exchange(connection, request)
            except EngineDisconnected:
                if connection.received:
                    raise
                # The engine had closed this idle connection, so nothing reached it: a new one.
        return await self._exchange(await self._connect(engine.url), request)

    async def _exchange(self, connection: _Connection, request: bytes) -> EngineResponse:
        response = connection.send(request, self.read_timeout)
        try:
            await response.headers()
        except BaseException:
            response.close()
            raise
        return response

    def _head(self, url: str, path: str, engine_key: str) -> bytes:
        key = (url, path, engine_key)
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) > 4096:
                self._heads.clear()
            host = url.removeprefix("http://").rstrip("/")
            head = self._heads[key] = (
                f"POST {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {engine_key}\r\n"
                "content-type: application/json\r\ncontent-length: "
            ).encode("latin-1")
        return head

    def _idle_connection(self, origin: str) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            transport = connection.transport
            if not connection.closed and transport is not None and not transport.is_closing():
                return connection
        return None

    async def _connect(self, origin: str) -> _Connection:
        url = yarl.URL(origin)
        host, port = url.host or "127.0.0.1", url.port or 80
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, origin), host, port
                )
        except TimeoutError as exc:
            raise EngineUnreachable(f"no connection within {self.connect_timeout:g}s") from exc
        except OSError as exc:
            raise EngineUnreachable(str(exc)) from exc
        return connection

    def put(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.origin, [])
        if len(idle) < self.MAX_IDLE:
            idle.append(connection)
        else:
            connection.close()

    def forget(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in list(idle):
                connection.close()
        self._idle.clear()
