"""The gateway's HTTP server: uvicorn's settings, and a transport that joins an answer's writes."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

import uvicorn
from fastapi import FastAPI

from server.config import Settings
from server.gateway.app import GatewayApp


def server_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn's settings for the gateway: uvloop and httptools when installed, writes joined."""
    http: type[asyncio.Protocol] | str = "auto"
    with contextlib.suppress(ImportError):  # no httptools: uvicorn's h11 protocol, as it is
        http = _joined_writes_protocol()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
        http=http,
        proxy_headers=not isinstance(app, GatewayApp),
    )
    if isinstance(app, GatewayApp):
        app.trust_forwarded_headers(config.forwarded_allow_ips)
    return config


class JoinedWrites:
    """A transport that sends two writes in one ``send`` call.

    uvicorn writes an answer's status line and headers, then its body: two
    system calls, and on loopback each costs about as much CPU as the
    gateway's own Python work for a request. Here a write waits for the next
    one, and both leave together: a whole answer is one system call, sent the
    moment its body is written. A write with no successor leaves at the loop's
    next turn. (Waiting for the turn's end instead held each answer behind
    every other request the turn processed: about a millisecond at 1,000
    requests/s.) Everything but ``write`` and ``close`` goes to the real transport.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._pending:
            self._pending.append(bytes(data))
            self.flush()
            return
        self._pending.append(bytes(data))
        self._loop.call_soon(self.flush)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _joined_writes_protocol() -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class JoinedWritesProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol writing through ``JoinedWrites``."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's transports do not subclass asyncio.Transport: a cast, not a check.
            joined = JoinedWrites(cast(asyncio.Transport, transport))
            super().connection_made(cast(asyncio.Transport, joined))

    return JoinedWritesProtocol
