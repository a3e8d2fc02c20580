"""The load generator against the real stub upstream (a subprocess): counts, streams,
open-loop accounting from scheduled send times, and its HTTP response parser."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import replace

import pytest

from bench import loadgen, targets

STREAM_CHUNKS = 5
CHUNK_MS = 10.0
STREAM_TIME = (STREAM_CHUNKS - 1) * CHUNK_MS / 1000


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    running = targets.start_stub(tmp_path_factory.mktemp("stub"))
    yield running.url
    running.stop()


@pytest.fixture(scope="module")
def slow_stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Streams take (STREAM_CHUNKS - 1) x CHUNK_MS each: the first event leaves at once."""
    work = tmp_path_factory.mktemp("slow-stub")
    running = targets.start_stub(work, stream_chunks=STREAM_CHUNKS, chunk_interval_ms=CHUNK_MS)
    yield running.url
    running.stop()


def test_closed_loop_counts_every_answer(stub: str) -> None:
    spec = loadgen.RunSpec(loadgen.Workload(stub), clients=4, duration=0.3, warmup=0.0)
    result = loadgen.run(spec)
    assert result.errors == 0
    assert result.ok > 10
    assert result.statuses == {"200": result.ok}
    assert result.total == result.ok


def test_staggered_clients_start_late(stub: str) -> None:
    # Three clients spread over 3 s, in a 0.5 s run: only the first one gets to send.
    spec = loadgen.RunSpec(loadgen.Workload(stub), clients=3, duration=0.5, warmup=0.0)
    staggered = loadgen.run(replace(spec, stagger=3.0, max_requests=10_000))
    assert staggered.ok > 0
    assert staggered.ok < loadgen.run(replace(spec, max_requests=10_000)).ok


def test_max_requests_bounds_a_run(stub: str) -> None:
    spec = loadgen.RunSpec(loadgen.Workload(stub), clients=2, duration=30, max_requests=25)
    spec = replace(spec, warmup=0.0)
    assert loadgen.run(spec).total == 25


def test_split_over_processes_merges_results(stub: str) -> None:
    spec = loadgen.RunSpec(loadgen.Workload(stub), clients=4, duration=0.3, warmup=0.0, procs=2)
    result = loadgen.run(spec)
    assert result.errors == 0
    assert result.ok == len(result.latencies) > 0


def test_streams_record_first_byte_before_last_event(slow_stub: str) -> None:
    workload = loadgen.Workload(slow_stub, stream=True)
    result = loadgen.run(loadgen.RunSpec(workload, clients=2, duration=0.3, warmup=0.0))
    assert result.errors == 0
    assert len(result.ttfb) == len(result.latencies) > 0
    stream_time = STREAM_TIME  # the first event arrives at once, [DONE] with the last one
    for first, last in zip(result.ttfb, result.latencies, strict=True):
        assert first < last
        assert last - first >= 0.8 * stream_time


def test_open_loop_charges_queueing_from_the_scheduled_time(slow_stub: str) -> None:
    """One connection, offered twice its capacity: later requests wait, and that wait counts."""
    workload = loadgen.Workload(slow_stub, stream=True)
    service = STREAM_TIME
    rate = 2 / service
    spec = loadgen.RunSpec(
        workload, mode="open", rate=rate, clients=1, duration=0.5, warmup=0.0, arrivals="constant"
    )
    result = loadgen.run(spec)
    assert result.errors == 0
    assert result.ok == int(rate * 0.5)
    # The k-th request cannot finish before k+1 services; measured from its schedule, the last
    # one waited about half the run, far longer than one service.
    assert max(result.latencies) > 0.2
    assert min(result.latencies) < 2 * service


def test_open_loop_drops_what_does_not_drain(slow_stub: str) -> None:
    workload = loadgen.Workload(slow_stub, stream=True)
    spec = loadgen.RunSpec(
        workload, mode="open", rate=200, clients=1, duration=0.2, warmup=0.0, drain=0.1
    )
    result = loadgen.run(spec)
    assert result.statuses.get("timeout", 0) > 0
    assert result.errors == result.statuses["timeout"]
    assert result.total == 40


def test_only_loopback_targets() -> None:
    with pytest.raises(loadgen.NotLoopback, match="loopback"):
        loadgen.run(loadgen.RunSpec(loadgen.Workload("http://10.0.0.1:80")))


def test_arrival_offsets() -> None:
    constant = loadgen.arrival_offsets(100, 5, "constant", seed=1)
    assert constant == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04])
    poisson = loadgen.arrival_offsets(1000, 20_000, "poisson", seed=1)
    gaps = [b - a for a, b in itertools.pairwise(poisson)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.001, rel=0.05)
    assert poisson == sorted(poisson)
    with pytest.raises(ValueError, match="positive"):
        loadgen.arrival_offsets(0, 5, "constant", seed=1)


def test_parser_needs_the_whole_content_length_body() -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"
    conn = loadgen.HttpConnection()

    async def go() -> tuple[bool, loadgen.Reply]:
        waiter = asyncio.get_running_loop().create_future()
        conn.waiter = waiter
        conn.data_received(head + b"01234")
        early = waiter.done()
        conn.data_received(b"56789")
        return early, waiter.result()

    early, reply = asyncio.run(go())
    assert not early
    assert reply.status == 200
    assert reply.first_byte <= reply.done


@pytest.mark.parametrize("split", [1, 3, 5, 7])
def test_parser_finds_the_chunked_end_split_across_reads(split: int) -> None:
    body = b"5\r\ndata:\r\n0\r\n\r\n"
    raw = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n" + body
    cut = len(raw) - split
    conn = loadgen.HttpConnection()

    async def go() -> tuple[bool, int]:
        waiter = asyncio.get_running_loop().create_future()
        conn.waiter = waiter
        conn.data_received(raw[:cut])
        early = waiter.done()
        conn.data_received(raw[cut:])
        return early, waiter.result().status

    early, status = asyncio.run(go())
    assert not early
    assert status == 404


def test_workload_bytes_are_a_valid_request() -> None:
    workload = loadgen.Workload("http://127.0.0.1:9", api_key="k", stream=True)
    raw = workload.request_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"authorization: Bearer k" in head
    assert f"content-length: {len(body)}".encode() in head
    assert b'"stream":true' in body
