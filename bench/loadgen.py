"""A cheap HTTP/1.1 load generator for loopback targets (closed and open loop).

Raw asyncio protocols (uvloop when installed) with keep-alive connections: far
cheaper per request than the targets it measures, and it can split a run over
several processes. Closed loop: N clients, each sends its next request when the
previous answer ends. Open loop: requests are scheduled at a fixed offered rate
(constant or Poisson arrivals) and each latency is measured from its SCHEDULED
send time, so a stalled target is charged for the queue it causes (no
coordinated omission). Streams record time to first body byte and to the end of
the stream (the last event). Every run is bounded in time and in count.

Run: ``.venv/bin/python -m bench.loadgen --url http://127.0.0.1:9100 --clients 16``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast
from urllib.parse import urlsplit

from bench.stats import summarize_ms
from bench.stub_upstream import install_uvloop

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
CHUNKED_END = b"\r\n0\r\n\r\n"


class NotLoopback(ValueError):
    """The load generator only targets this machine; use a 127.0.0.1 URL."""


class ConnectionLost(ConnectionError):
    """The target closed a connection with a request in flight."""


@dataclass(frozen=True)
class Workload:
    """One request shape, sent over and over."""

    url: str
    """Target base URL, loopback only (``http://127.0.0.1:PORT``)."""
    path: str = "/v1/chat/completions"
    """Request path."""
    model: str = "stub-model"
    """``model`` in the body."""
    stream: bool = False
    """Ask for an SSE stream."""
    api_key: str = ""
    """Bearer token; empty sends no Authorization header."""
    max_tokens: int = 8
    """``max_tokens`` in the body."""
    prompt: str = "Say something short."
    """The user message (chat) or prompt (completions)."""

    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if host not in LOOPBACK:
            raise NotLoopback(f"{self.url}: only loopback targets are allowed (127.0.0.1)")
        return host, parts.port or 80

    def body(self) -> bytes:
        payload: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens}
        if self.path.endswith("/chat/completions"):
            payload["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            payload["prompt"] = self.prompt
        if self.stream:
            payload["stream"] = True
        return json.dumps(payload, separators=(",", ":")).encode()

    def request_bytes(self) -> bytes:
        host, port = self.address()
        body = self.body()
        auth = f"authorization: Bearer {self.api_key}\r\n" if self.api_key else ""
        head = (
            f"POST {self.path} HTTP/1.1\r\nhost: {host}:{port}\r\n{auth}"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


@dataclass(frozen=True)
class RunSpec:
    """How long and how hard to drive one workload."""

    workload: Workload
    mode: str = "closed"
    """``closed`` (N clients back to back) or ``open`` (fixed offered rate)."""
    clients: int = 1
    """Closed loop: concurrent clients. Open loop: the most connections opened."""
    rate: float = 0.0
    """Open loop: offered requests per second."""
    arrivals: str = "poisson"
    """Open loop: ``poisson`` or ``constant`` inter-arrival times."""
    duration: float = 5.0
    """Seconds of load (after warm-up)."""
    max_requests: int = 1_000_000
    """Stop after this many requests even if time remains."""
    warmup: float = 0.5
    """Seconds of the same load before recording starts."""
    procs: int = 1
    """Processes the run is split over (closed loop: clients are divided among them)."""
    seed: int = 1
    """Seed for Poisson arrivals."""
    stagger: float = 0.0
    """Closed loop: client i of N sends its first request i/N of this many seconds late.
    Clients whose requests take equally long (paced streams) otherwise arrive together
    every round: one burst, not N requests in flight."""
    drain: float = 10.0
    """Seconds to wait for answers still in flight when the load stops; then they count as
    timeouts (a saturated target cannot stretch a run without bound)."""


@dataclass
class RunResult:
    """What one run recorded; latencies in seconds."""

    spec: dict[str, Any]
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    total: int = 0
    """Answers and failures seen, warm-up included (divides CPU time per request)."""
    late_sends: int = 0
    """Open loop: requests sent more than 2 ms after their scheduled time (load generator lag)."""

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def summary(self) -> dict[str, Any]:
        return {
            "requests_ok": self.ok,
            "errors": self.errors,
            "statuses": self.statuses,
            "elapsed_s": self.elapsed,
            "rps": self.ok / self.elapsed if self.elapsed else 0.0,
            "latency": summarize_ms(self.latencies),
            "ttfb": summarize_ms(self.ttfb) if self.ttfb else {"count": 0},
            "late_sends": self.late_sends,
            "total_incl_warmup": self.total,
        }

    def merge(self, other: RunResult) -> None:
        self.elapsed = max(self.elapsed, other.elapsed)
        self.latencies += other.latencies
        self.ttfb += other.ttfb
        self.errors += other.errors
        self.late_sends += other.late_sends
        self.total += other.total
        for status, count in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + count


@dataclass
class Reply:
    status: int
    first_byte: float
    done: float


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Reply] | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.head = b""
        self.in_body = False
        self.status = 0
        self.remaining = -1  # bytes left with content-length; -1 when chunked
        self.tail = b""
        self.first_byte = 0.0

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionLost("connection closed mid-request"))

    def request(self, payload: bytes) -> asyncio.Future[Reply]:
        assert self.transport is not None
        self._reset()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            data = self.head[end + 4 :]
            self._parse_head(self.head[:end])
        if data and not self.first_byte:
            self.first_byte = now
        if self._body_complete(data):
            self._finish(now)

    def _parse_head(self, head: bytes) -> None:
        self.in_body = True
        lines = head.decode("latin-1").lower().split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1])
        self.remaining = -1
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name == "content-length":
                self.remaining = int(value)

    def _body_complete(self, data: bytes) -> bool:
        if self.remaining >= 0:
            self.remaining -= len(data)
            return self.remaining <= 0
        # Chunked: the terminating zero-size chunk can only appear at the end.
        self.tail = (self.tail + data)[-len(CHUNKED_END) :]
        return self.tail.endswith(CHUNKED_END) or self.tail == CHUNKED_END[2:]

    def _finish(self, now: float) -> None:
        waiter = self.waiter
        self.waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(Reply(self.status, self.first_byte or now, now))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Recorder:
    """Collects replies that started after the warm-up and before the deadline."""

    def __init__(self, result: RunResult, record_from: float, stream: bool) -> None:
        self.result = result
        self.record_from = record_from
        self.stream = stream
        self.statuses: Counter[str] = Counter()

    def add(self, started: float, reply: Reply | None) -> None:
        self.result.total += 1
        if started < self.record_from:
            return
        if reply is None:
            self.result.errors += 1
            self.statuses["error"] += 1
            return
        self.statuses[str(reply.status)] += 1
        if reply.status != 200:
            self.result.errors += 1
            return
        self.result.latencies.append(reply.done - started)
        if self.stream:
            self.result.ttfb.append(reply.first_byte - started)

    def timed_out(self, count: int) -> None:
        if not count:
            return
        self.result.errors += count
        self.result.total += count
        self.statuses["timeout"] += count

    def close(self, elapsed: float) -> RunResult:
        self.result.elapsed = elapsed
        self.result.statuses = dict(self.statuses)
        return self.result


async def _exchange(conn: HttpConnection, payload: bytes) -> Reply | None:
    try:
        return await conn.request(payload)
    except ConnectionError:
        return None


async def _closed_client(
    host: str,
    port: int,
    payload: bytes,
    recorder: Recorder,
    deadline: float,
    budget: list[int],
    delay: float = 0.0,
) -> None:
    conn = await HttpConnection.open(host, port)
    await asyncio.sleep(delay)
    try:
        while budget[0] > 0:
            started = time.perf_counter()
            if started >= deadline:
                return
            budget[0] -= 1
            reply = await _exchange(conn, payload)
            recorder.add(started, reply)
            if conn.closed:
                conn = await HttpConnection.open(host, port)
    finally:
        conn.close()


async def run_closed(spec: RunSpec) -> RunResult:
    host, port = spec.workload.address()
    payload = spec.workload.request_bytes()
    start = time.perf_counter()
    record_from = start + spec.warmup
    deadline = record_from + spec.duration
    recorder = Recorder(RunResult(_spec_dict(spec)), record_from, spec.workload.stream)
    budget = [spec.max_requests]
    clients = [
        _closed_client(
            host, port, payload, recorder, deadline, budget, spec.stagger * i / spec.clients
        )
        for i in range(spec.clients)
    ]
    await _bounded(recorder, [asyncio.ensure_future(c) for c in clients], deadline + spec.drain)
    return recorder.close(min(time.perf_counter(), deadline) - record_from)


async def _bounded(recorder: Recorder, tasks: Sequence[asyncio.Future[None]], until: float) -> None:
    """Wait for ``tasks`` until the monotonic-clock time ``until``; cancel and count the rest."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, until - time.perf_counter()))
    for task in pending:
        task.cancel()
    recorder.timed_out(len(pending))


class Pool:
    """Idle keep-alive connections; opens more up to ``limit``, then callers queue.

    A connection the target closed is replaced by a ``None`` token in the queue,
    which tells the next caller to open a fresh one.
    """

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.size = 0
        self.idle: asyncio.Queue[HttpConnection | None] = asyncio.Queue()

    async def acquire(self) -> HttpConnection:
        if self.idle.empty() and self.size < self.limit:
            self.size += 1
            return await HttpConnection.open(self.host, self.port)
        conn = await self.idle.get()
        if conn is None or conn.closed:
            return await HttpConnection.open(self.host, self.port)
        return conn

    def release(self, conn: HttpConnection) -> None:
        self.idle.put_nowait(None if conn.closed else conn)

    def close(self) -> None:
        while not self.idle.empty():
            conn = self.idle.get_nowait()
            if conn is not None:
                conn.close()


def arrival_offsets(rate: float, count: int, arrivals: str, seed: int) -> list[float]:
    """Scheduled send times (seconds from the start) for ``count`` requests at ``rate``/s."""
    if rate <= 0:
        raise ValueError("open loop needs a positive offered rate")
    if arrivals == "constant":
        return [i / rate for i in range(count)]
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += rng.expovariate(rate)
    return offsets


async def _open_request(pool: Pool, payload: bytes, scheduled: float, recorder: Recorder) -> None:
    conn = await pool.acquire()
    reply = await _exchange(conn, payload)
    pool.release(conn)
    recorder.add(scheduled, reply)


async def run_open(spec: RunSpec) -> RunResult:
    host, port = spec.workload.address()
    payload = spec.workload.request_bytes()
    pool = Pool(host, port, max(spec.clients, 1))
    warm = [await pool.acquire() for _ in range(min(8, pool.limit))]
    for conn in warm:
        pool.release(conn)
    count = min(spec.max_requests, int(spec.rate * (spec.warmup + spec.duration)))
    offsets = arrival_offsets(spec.rate, count, spec.arrivals, spec.seed)
    start = time.perf_counter()
    recorder = Recorder(RunResult(_spec_dict(spec)), start + spec.warmup, spec.workload.stream)
    # Only requests in flight are kept. Waiting on every task of the run at its end (thousands)
    # once blocked this process for 240 ms, and the last requests in flight were charged for it.
    in_flight: set[asyncio.Future[None]] = set()
    for offset in offsets:
        scheduled = start + offset
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.002 and scheduled >= recorder.record_from:
            recorder.result.late_sends += 1
        task = asyncio.ensure_future(_open_request(pool, payload, scheduled, recorder))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await _bounded(recorder, list(in_flight), time.perf_counter() + spec.drain)
    pool.close()
    return recorder.close(max(spec.duration, offsets[-1] - spec.warmup) if offsets else 0.0)


def _spec_dict(spec: RunSpec) -> dict[str, Any]:
    data = asdict(spec)
    data["workload"].pop("api_key", None)
    return data


def _run_in_process(spec: RunSpec) -> RunResult:
    install_uvloop()
    runner = run_closed if spec.mode == "closed" else run_open
    # No cyclic garbage collection while measuring: a collection pauses this process, and
    # every request in flight would be charged for it. A run is seconds long and bounded.
    gc.collect()
    gc.disable()
    try:
        return asyncio.run(runner(spec))
    finally:
        gc.enable()


def run(spec: RunSpec) -> RunResult:
    """Run ``spec`` (split over ``spec.procs`` processes) and return the merged result."""
    spec.workload.address()
    if spec.procs <= 1:
        return _run_in_process(spec)
    parts = _split(spec)
    context = multiprocessing.get_context("fork")
    with context.Pool(len(parts)) as pool:
        results = pool.map(_run_in_process, parts)
    merged = RunResult(_spec_dict(spec))
    for result in results:
        merged.merge(result)
    return merged


def _split(spec: RunSpec) -> list[RunSpec]:
    """Divide clients (closed) or offered rate (open) evenly over the processes."""
    procs = max(1, min(spec.procs, spec.clients))
    parts = []
    for i in range(procs):
        clients = spec.clients // procs + (1 if i < spec.clients % procs else 0)
        parts.append(
            replace(
                spec,
                clients=clients,
                rate=spec.rate / procs,
                max_requests=spec.max_requests // procs,
                procs=1,
                seed=spec.seed + i,
            )
        )
    return parts


def parse_args(argv: list[str] | None = None) -> RunSpec:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--model", default="stub-model")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--mode", choices=["closed", "open"], default="closed")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--arrivals", choices=["poisson", "constant"], default="poisson")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--procs", type=int, default=1)
    args = parser.parse_args(argv)
    workload = Workload(
        url=args.url, path=args.path, model=args.model, stream=args.stream, api_key=args.api_key
    )
    return RunSpec(
        workload=workload,
        mode=args.mode,
        clients=args.clients,
        rate=args.rate,
        arrivals=args.arrivals,
        duration=args.duration,
        max_requests=args.max_requests,
        procs=args.procs,
    )


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(parse_args(argv)).summary(), indent=2))


if __name__ == "__main__":
    main()
