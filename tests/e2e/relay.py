"""A pausable TCP relay for end-to-end tests: real bytes, held back on demand.

Put between a gateway and the real engine, it forwards both ways untouched until
``paused()``: then nothing more of the engine's answers to inference requests (a POST)
reaches the gateway, so every request already sent stays in flight, however fast the
engine generates, until the block ends. Health probes still flow, so the gateway does
not take the held engine for a dead one. Tests use it to make "while a request is in
flight" a fact instead of a race against the engine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator


class Relay:
    """Listens on 127.0.0.1 at a free port and forwards each connection to ``target_port``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def start(self) -> Relay:
        self._loop.call_soon_threadsafe(self._flowing.set)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold back everything the engine sends for the duration of the block."""
        self._loop.call_soon_threadsafe(self._flowing.clear)
        try:
            yield
        finally:
            self._loop.call_soon_threadsafe(self._flowing.set)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._relay, sock=self._sock))
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            engine_r, engine_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        client_r, engine_r = self._readers(client_r, engine_r)
        link = _Link()
        await asyncio.gather(
            self._pump(client_r, engine_w, link, to_engine=True),
            self._pump(engine_r, client_w, link, to_engine=False),
        )

    def _readers(
        self, from_client: asyncio.StreamReader, from_engine: asyncio.StreamReader
    ) -> tuple[asyncio.StreamReader, asyncio.StreamReader]:
        """One connection's two readers; a subclass may wrap them to watch the bytes."""
        return from_client, from_engine

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        to_engine: bool,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if to_engine:
                    link.inference = link.inference or b"POST " in data
                elif link.inference:
                    await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


class _Link:
    """One relayed connection: whether it carried an inference request (a pause holds
    the answers on such connections only)."""

    inference = False
