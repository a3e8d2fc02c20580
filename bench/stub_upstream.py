"""A fast OpenAI-compatible STUB upstream, so benchmarks measure the gateway, not the engine.

It answers ``/v1/chat/completions`` and ``/v1/completions`` (non-streaming, and
SSE streaming with a fixed number of chunks, ``stream_options.include_usage``
honoured), ``/health`` and ``/v1/models``. It generates nothing: every answer is
a canned body. It is a raw asyncio protocol (uvloop when installed) with
keep-alive and canned bytes, because a framework would make the stub, not the
gateway, the bottleneck. Its own ceiling is measured and reported beside every
gateway figure.

Run: ``.venv/bin/python -m bench.stub_upstream --port 9100``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, cast

MAX_HEADER_BYTES = 65536


@dataclass(frozen=True)
class StubConfig:
    """What the stub answers."""

    host: str = "127.0.0.1"
    """Loopback address it listens on."""
    port: int = 9100
    """TCP port it listens on."""
    model: str = "stub-model"
    """Model name listed by ``/v1/models``; completions echo the requested one."""
    stream_chunks: int = 8
    """Content chunks per streamed answer (one token each), before usage and [DONE]."""
    chunk_interval_ms: float = 0.0
    """Pause between streamed chunks; 0 writes each chunk as soon as the previous one."""
    completion_tokens: int = 8
    """Completion tokens reported in usage."""


def _json(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _chunk(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


class Canned:
    """Prebuilt answer bytes per (path, model); built once, then served from a dict."""

    def __init__(self, config: StubConfig) -> None:
        self.config = config
        self._full: dict[tuple[str, str], bytes] = {}
        self._events: dict[tuple[str, str, bool], list[bytes]] = {}
        self.health = _response("200 OK", b"{}")
        self.models = _response(
            "200 OK", _json({"object": "list", "data": [{"id": config.model, "object": "model"}]})
        )
        self.not_found = _response("404 Not Found", _json({"error": {"message": "not found"}}))
        self.bad_request = _response("400 Bad Request", _json({"error": {"message": "bad json"}}))

    def usage(self) -> dict[str, int]:
        done = self.config.completion_tokens
        return {"prompt_tokens": 16, "completion_tokens": done, "total_tokens": 16 + done}

    def full(self, path: str, model: str) -> bytes:
        key = (path, model)
        if key not in self._full:
            self._full[key] = _response("200 OK", _json(self._full_payload(path, model)))
        return self._full[key]

    def _full_payload(self, path: str, model: str) -> dict[str, Any]:
        text = "x" * self.config.completion_tokens
        if path == "/v1/chat/completions":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length",
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "length"}
            kind = "text_completion"
        return {
            "id": "cmpl-stub",
            "object": kind,
            "created": 0,
            "model": model,
            "choices": [choice],
            "usage": self.usage(),
        }

    def events(self, path: str, model: str, include_usage: bool) -> list[bytes]:
        """Chunked-encoding frames: the head, then N content events, the last one carrying
        the usage event (if asked for), [DONE] and the end of the body."""
        key = (path, model, include_usage)
        if key not in self._events:
            self._events[key] = self._build_events(path, model, include_usage)
        return self._events[key]

    def _build_events(self, path: str, model: str, include_usage: bool) -> list[bytes]:
        chat = path == "/v1/chat/completions"
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[Any], usage: dict[str, int] | None = None) -> bytes:
            payload = {"id": "cmpl-stub", "object": kind, "created": 0, "model": model}
            payload["choices"] = choices
            if usage is not None:
                payload["usage"] = usage
            return _chunk(b"data: " + _json(payload) + b"\n\n")

        def content(i: int) -> list[Any]:
            if chat:
                return [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]
            return [{"index": 0, "text": "x", "finish_reason": None}]

        frames = [event(content(i)) for i in range(self.config.stream_chunks)]
        # The usage event, [DONE] and the end leave with the last token, as an engine sends
        # them: paced like tokens, they would delay the usage a gateway asks for (and a
        # client may not) by one interval, and charge it to the gateway.
        tail = event([], self.usage()) if include_usage else b""
        tail += _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        if frames:
            frames[-1] += tail
        else:
            frames.append(tail)
        head = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        return [head, *frames]


class StubProtocol(asyncio.Protocol):
    """One keep-alive connection: parse requests with a minimal HTTP/1.1 reader."""

    def __init__(self, canned: Canned) -> None:
        self.canned = canned
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.streaming and self._serve_one():
            pass

    def _serve_one(self) -> bool:
        """Answer one complete request from the buffer; False if it is not complete yet."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEADER_BYTES and self.transport:
                self.transport.close()
            return False
        head = self.buffer[:end].decode("latin-1")
        length = _content_length(head)
        if len(self.buffer) < end + 4 + length:
            return False
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        method, path = _request_line(head)
        self._answer(method, path, body)
        return True

    def _answer(self, method: str, path: str, body: bytes) -> None:
        assert self.transport is not None
        path = path.split("?", 1)[0]
        if path in ("/v1/chat/completions", "/v1/completions") and method == "POST":
            self._complete(path, body)
        elif path == "/health":
            self.transport.write(self.canned.health)
        elif path == "/v1/models":
            self.transport.write(self.canned.models)
        else:
            self.transport.write(self.canned.not_found)

    def _complete(self, path: str, body: bytes) -> None:
        assert self.transport is not None
        try:
            request = json.loads(body)
            model = str(request.get("model", self.canned.config.model))
        except (ValueError, AttributeError):
            self.transport.write(self.canned.bad_request)
            return
        if not request.get("stream"):
            self.transport.write(self.canned.full(path, model))
            return
        options = request.get("stream_options") or {}
        frames = self.canned.events(path, model, bool(options.get("include_usage")))
        interval = self.canned.config.chunk_interval_ms / 1000
        if interval <= 0:
            self.transport.write(b"".join(frames[:2]))
            for frame in frames[2:]:
                self.transport.write(frame)
            return
        self.streaming = True
        self._write_frames(frames, 0, interval)

    def _write_frames(self, frames: list[bytes], index: int, interval: float) -> None:
        """Write the head and first event together, then one event per ``interval``."""
        assert self.transport is not None
        if self.transport.is_closing():
            return
        if index == 0:
            self.transport.write(frames[0] + frames[1])
            index = 2
        else:
            self.transport.write(frames[index])
            index += 1
        if index < len(frames):
            loop = asyncio.get_running_loop()
            loop.call_later(interval, self._write_frames, frames, index, interval)
            return
        self.streaming = False
        if self.buffer:
            self.data_received(b"")


def _content_length(head: str) -> int:
    lowered = head.lower()
    at = lowered.find("\r\ncontent-length:")
    if at < 0:
        return 0
    start = at + len("\r\ncontent-length:")
    stop = lowered.find("\r\n", start)
    return int(lowered[start : stop if stop >= 0 else None].strip())


def _request_line(head: str) -> tuple[str, str]:
    line = head.split("\r\n", 1)[0].split(" ")
    return (line[0], line[1]) if len(line) >= 2 else ("", "")


def install_uvloop() -> bool:
    """Use uvloop when installed: the stub and the load generator both gain ~2x."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def serve(config: StubConfig) -> None:
    loop = asyncio.get_running_loop()
    canned = Canned(config)
    server = await loop.create_server(
        lambda: StubProtocol(canned), config.host, config.port, backlog=4096, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def parse_args(argv: list[str] | None = None) -> StubConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    defaults = StubConfig()
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--stream-chunks", type=int, default=defaults.stream_chunks)
    parser.add_argument("--chunk-interval-ms", type=float, default=defaults.chunk_interval_ms)
    args = parser.parse_args(argv)
    return StubConfig(
        host=args.host,
        port=args.port,
        model=args.model,
        stream_chunks=args.stream_chunks,
        chunk_interval_ms=args.chunk_interval_ms,
    )


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    install_uvloop()
    print(f"stub upstream on http://{config.host}:{config.port} at {time.time():.0f}", flush=True)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
