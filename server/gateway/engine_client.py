"""The engine hop: the gateway's own keep-alive HTTP/1.1 client for plain-http engines.

Keep-alive connections per engine, one write per request, answers parsed by
httptools (uvicorn's parser). aiohttp cost about a third of the gateway's CPU per
proxied request in the profile; this costs a fraction of that. https engines,
and installs without httptools, use aiohttp (``server/gateway/proxy.py``).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncGenerator
from typing import cast

import yarl

from server.gateway.replicas import Engine

try:
    import httptools
except ImportError:  # uvicorn's optional parser; without it every engine hop uses aiohttp
    httptools = None  # type: ignore[assignment]


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

    def drop(self, origin: str) -> None:
        """Close the idle connections to an engine that left the fleet."""
        for connection in self._idle.pop(origin, []):
            connection.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in list(idle):
                connection.close()
        self._idle.clear()
