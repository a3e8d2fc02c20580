"""A flooding tenant waits behind its own in-flight token budget, on the real engine.

One more ``loraplex serve`` runs in front of the session's engine, through a pausable
relay (``tests/e2e/relay.py``) that also counts the requests reaching the engine, with
a tenant in-flight budget of 1,000 tokens: one of the flood's 900-token requests at a
time. While the relay holds the engine's answers back (so the flood's first request
stays in flight, however fast the engine is), the flood's further requests wait at the
gateway and never reach the engine, a quiet tenant's request goes to the engine ahead
of them, and a waiting request whose client hangs up is dropped. Once the answers flow,
the flood's first stream is abandoned mid-way and the request that waited takes its
place: nothing it held is leaked. Then the engine's own scheduling: the session's
engine runs with the default flags (``--scheduling-policy priority``), and each request
reaches it with the priority its tenant's share of the engines gives it, a tenant holding
nothing ahead of one already in flight, whatever ``priority`` the clients sent.
Assertions are on counts and order, never on time.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import httpx
import pytest

from registry import Registry
from tests.e2e.conftest import TenantKeys, make_tenant
from tests.e2e.probes import gateway_on_engine
from tests.e2e.relay import Relay
from tests.e2e.serving import ServeProcess, metric_samples, shared_registry_env

BUDGET = 1000
"""The gateway's tenant in-flight budget, in tokens."""
FLOOD = {"prompt": "Tell a long story", "max_tokens": 900, "ignore_eos": True}
"""About 906 tokens (17 characters at 3 a token, and 900 to complete): one fits the budget."""
FOLLOWER = {"prompt": "And then", "max_tokens": 120}
"""About 123 tokens: it fits the budget, but not beside a flood request."""
QUIET = {"prompt": "Hi", "max_tokens": 4}


PRIORITY = re.compile(rb'"priority":(-?\d+)')
"""The engine priority in a request body, as the gateway serializes it (no spaces)."""


class _Watched:
    """A relay reader that shows each chunk it reads (b"" at the end) to ``seen``."""

    def __init__(self, reader: asyncio.StreamReader, seen: Callable[[bytes], None]) -> None:
        self.reader, self.seen = reader, seen

    async def read(self, size: int) -> bytes:
        data = await self.reader.read(size)
        self.seen(data)
        return data


class _Tally:
    """One relayed connection's requests, as the relay's count sees them.

    A request is counted as the gateway sends it (it writes each request whole). If the
    engine closes the connection without answering it, it never reached the engine: the
    engine had closed that idle connection as the request went out, and the gateway sends
    it again on a new one. It is uncounted then, before the gateway can see the close.
    """

    def __init__(self, relay: CountingRelay) -> None:
        self.relay, self.requests, self.answers = relay, 0, 0
        self.priorities: list[int] = []

    def sent(self, data: bytes) -> None:
        count = data.count(b"POST /v1/")
        self.requests += count
        self.relay.requests += count
        carried = [int(value) for value in PRIORITY.findall(data)]
        self.priorities += carried
        self.relay.priorities += carried

    def received(self, data: bytes) -> None:
        self.answers += data.count(b"HTTP/1.1 ")
        unanswered = self.requests - self.answers
        if data or unanswered <= 0:
            return
        self.relay.requests -= unanswered  # the engine closed the connection on them
        for priority in self.priorities[-unanswered:]:
            at = len(self.relay.priorities) - 1 - self.relay.priorities[::-1].index(priority)
            del self.relay.priorities[at]


class CountingRelay(Relay):
    """The pausable relay, counting the inference requests that reach the engine and
    reading the priority each carries."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.requests = 0
        self.priorities: list[int] = []

    def _readers(
        self, from_client: asyncio.StreamReader, from_engine: asyncio.StreamReader
    ) -> tuple[asyncio.StreamReader, asyncio.StreamReader]:
        tally = _Tally(self)
        return (
            cast(asyncio.StreamReader, _Watched(from_client, tally.sent)),
            cast(asyncio.StreamReader, _Watched(from_engine, tally.received)),
        )


@pytest.fixture(scope="module")
def relay(gateway: ServeProcess, engine_port: int) -> Iterator[CountingRelay]:
    """Between this test's gateway and the session's engine (``gateway``: it is running)."""
    counting = CountingRelay(engine_port)
    counting.start()
    try:
        yield counting
    finally:
        counting.stop()


@pytest.fixture(scope="module")
def fair_gateway(
    gateway: ServeProcess,
    relay: CountingRelay,
    engine_key: str,
    base_name: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServeProcess]:
    args = ["--served-model-name", base_name, "--tenant-max-in-flight-tokens", str(BUDGET)]
    home = tmp_path_factory.mktemp("fairness")
    serve = gateway_on_engine(home, relay.port, engine_key, args, shared_registry_env(gateway))
    try:
        serve.wait_ready(timeout=120)
        yield serve
    finally:
        assert serve.stop(), serve.log_tail()


def queued(serve: ServeProcess, tenant: TenantKeys) -> float:
    samples = metric_samples(serve.url, "loraplex_queued_requests")
    return sum(value for labels, value in samples if labels.get("tenant") == tenant.name)


def wait_until(what: str, holds: Callable[[], bool], serve: ServeProcess) -> None:
    """Poll ``holds`` (the counts settle within moments); fail naming ``what``."""
    deadline = time.monotonic() + 20
    while not holds():
        assert time.monotonic() < deadline, f"never true: {what}\n{serve.log_tail()}"
        time.sleep(0.05)


class Call(threading.Thread):
    """One request in a thread: its status and what it read (a stream: up to its first event)."""

    def __init__(self, serve: ServeProcess, tenant: TenantKeys, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.key = serve.url + "/v1/completions", tenant.key
        self.body, self.status, self.text = body, 0, ""

    def run(self) -> None:
        headers = {"authorization": f"Bearer {self.key}"}
        with httpx.stream("POST", self.url, json=self.body, headers=headers, timeout=120) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                self.text += line
                if line.startswith("data: "):
                    break  # a stream abandoned after its first event: the client hangs up

    def result(self) -> tuple[int, str]:
        self.join(timeout=120)
        assert not self.is_alive(), "the request never ended"
        return self.status, self.text


def raw_request(serve: ServeProcess, tenant: TenantKeys, body: dict[str, Any]) -> socket.socket:
    """A request sent over a bare socket, so the test decides when its client hangs up."""
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {tenant.key}"
        f"\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    )
    client = socket.create_connection(("127.0.0.1", serve.port))
    client.sendall(head.encode() + data)
    return client


def test_a_flood_waits_behind_its_own_budget_and_a_quiet_tenant_goes_first(
    fair_gateway: ServeProcess, relay: CountingRelay, registry: Registry, base_name: str
) -> None:
    flood, quiet = (
        make_tenant(registry, f"{n}-{secrets.token_hex(3)}") for n in ("flood", "quiet")
    )
    model = {"model": base_name}
    sent = relay.requests
    with relay.paused():  # the engine's answers are held: the first flood request stays in flight
        first = Call(fair_gateway, flood, {**model, **FLOOD, "stream": True})
        first.start()
        wait_until(
            "the first flood request reached the engine",
            lambda: relay.requests == sent + 1,
            fair_gateway,
        )
        hung_up = raw_request(fair_gateway, flood, {**model, **FLOOD})
        follower = Call(fair_gateway, flood, {**model, **FOLLOWER})
        follower.start()
        wait_until(
            "two flood requests wait", lambda: queued(fair_gateway, flood) == 2, fair_gateway
        )
        assert relay.requests == sent + 1  # waiting at the gateway, not in the engine's queue

        ahead = Call(fair_gateway, quiet, {**model, **QUIET})
        ahead.start()
        wait_until(
            "the quiet request reached the engine", lambda: relay.requests == sent + 2, fair_gateway
        )
        assert queued(fair_gateway, flood) == 2 and queued(fair_gateway, quiet) == 0

        hung_up.close()  # its client leaves while it waits: it is dropped, and takes no turn
        wait_until(
            "the abandoned request left the queue",
            lambda: queued(fair_gateway, flood) == 1,
            fair_gateway,
        )
        assert relay.requests == sent + 2

    assert ahead.result()[0] == 200
    status, text = first.result()  # read up to its first event, then abandoned mid-stream
    assert status == 200 and text.startswith("data: "), text
    status, text = follower.result()  # started in the first one's place: nothing was leaked
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] >= 1, text
    assert relay.requests == sent + 3  # the first, the quiet one, the follower; never the abandoned
    assert queued(fair_gateway, flood) == 0


def test_the_engine_schedules_by_the_gateways_priority_never_the_clients(
    gateway: ServeProcess,
    fair_gateway: ServeProcess,
    relay: CountingRelay,
    registry: Registry,
    base_name: str,
) -> None:
    engines = gateway.engine_processes()
    assert engines, gateway.log_tail()
    argv = engines[0].cmdline()
    assert argv[argv.index("--scheduling-policy") + 1] == "priority"  # the default flags
    busy, idle = (make_tenant(registry, f"{n}-{secrets.token_hex(3)}") for n in ("busy", "idle"))
    jump = {"model": base_name, "priority": -1000}  # a client's bid to go first: ignored
    sent, seen = relay.requests, len(relay.priorities)
    with relay.paused():  # the first stays in flight while the others start
        calls = [
            Call(fair_gateway, busy, {**jump, **FLOOD, "stream": True}),
            Call(fair_gateway, busy, {**jump, **QUIET}),  # fits the budget beside the first
            Call(fair_gateway, idle, {**jump, **QUIET}),
        ]
        for reached, call in enumerate(calls, start=1):
            call.start()
            wait_until(
                f"request {reached} reached the engine",
                lambda reached=reached: relay.requests == sent + reached,
                fair_gateway,
            )
    assert [call.result()[0] for call in calls] == [200, 200, 200]  # the engine took them all
    first, beside, quiet = relay.priorities[seen:]
    assert first == 0 and quiet == 0  # their tenants held nothing else
    assert beside > 0  # its tenant held the first: it goes behind the idle tenant's
