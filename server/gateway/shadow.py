"""Shadow traffic: copies of production requests sent to a candidate version, after the
real answer, never returned to anyone.

A request that resolved to an adapter's production version carries the candidate of its
``shadow`` alias (``router.shadow_target``); ``Shadow.begin`` samples the alias's share
of those requests. A sampled request keeps its answer's bytes (``proxy.KeptAnswer``,
shared with capture) and, once that answer has ended whole, its copy goes to the
candidate in a background task: not streamed, with the engines' lowest priority, on no
seat of the fair queue and under no tenant's limits. A copy is dropped, never queued,
when the base's replicas are crowded (someone waits at the fair queue, or the in-flight
tokens are full), no replica is healthy, or this gateway already has
``shadow_max_in_flight`` copies out.

The pair of answer texts (production's, the candidate's) joins a bounded book, written
every ``FLUSH_EVERY`` seconds to ``registry.shadow`` (which compares them); tokens and
outcomes go to ``loraplex_shadow_copies_total`` and ``loraplex_shadow_tokens_total``.

What the real request pays: when its adapter has no shadow alias, one dict lookup
(``resolution.Resolver``); when it has one, a random draw, and, if sampled, its
answer's bytes kept and a task started as it ends (``bench/gateway.py`` measures it).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

import router
from registry.shadow import ShadowBatch, ShadowStore
from server.gateway.capture import stream_chunks
from server.gateway.forwarding import Forwarder
from server.gateway.metrics import Metrics
from server.gateway.proxy import KeptAnswer, Outcome, TokenUsage, UpstreamError, UpstreamFailure
from server.gateway.replicas import Replicas
from server.gateway.resolution import Route
from server.gateway.tenancy import Caller

log = logging.getLogger("loraplex.shadow")

FLUSH_EVERY = 2.0
"""Seconds between writes of the book to the registry."""
MAX_BOOK_PAIRS = 4096
"""Compared pairs the book holds between writes, at most; past it new ones are dropped."""
KEPT_BYTES = 1 << 20
"""Bytes of production's answer kept for the comparison when capture keeps none."""

ANSWERED = "answered"
FAILED = "failed"
BUSY = "busy"
UNREADABLE = "unreadable"
BOOK_FULL = "book_full"
WRITE_FAILED = "write_failed"

BookKey = tuple[int, str, int, int]
"""(tenant id, adapter, candidate version, production version)."""


@dataclass(slots=True)
class ShadowCopy:
    """A sampled production request whose copy goes to the candidate once its answer ends."""

    shadow: Shadow
    key: BookKey
    route: Route
    path: str
    body: dict[str, Any]
    """What the candidate is sent: the client's request, re-addressed and not streamed."""
    streamed: bool
    """Whether production's answer is a stream (its kept bytes are events)."""
    kept: KeptAnswer | None = None

    def finished(self, outcome: Outcome) -> None:
        """``Outcome.on_finish`` callback: a whole, successful answer sends the copy."""
        if outcome.status == 200 and not outcome.error and self.kept is not None:
            self.shadow.offer(self)


class Shadow:
    """The gateway's shadow copies: which requests get one, sending them, and their book."""

    def __init__(
        self,
        store: ShadowStore,
        replicas: Replicas,
        forwarder: Forwarder,
        metrics: Metrics,
        max_in_flight: int,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.replicas = replicas
        self.forwarder = forwarder
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        """Copies this gateway has out at once, at most (0: shadow traffic off)."""
        self._draw = draw
        self._tasks: set[asyncio.Task[None]] = set()
        self._book: dict[BookKey, ShadowBatch] = {}
        self._tenant_names: dict[BookKey, str] = {}
        """Tenant names of the book's keys, for the metrics of a failed write."""
        self._book_pairs = 0

    def begin(
        self, path: str, caller: Caller, route: Route, body: dict[str, Any]
    ) -> ShadowCopy | None:
        """The copy of this request if it is sampled for its adapter's shadow, else None.
        Call before the body is rewritten for the engine."""
        target = route.shadow
        if target is None or route.version is None or self.max_in_flight == 0:
            return None
        if self._draw() >= target.share:
            return None
        copy = dict(body)
        copy["model"] = target.version.lora_name
        copy["stream"] = False
        copy.pop("stream_options", None)
        key = (caller.tenant_id, route.version.adapter, target.version.number, route.version.number)
        return ShadowCopy(self, key, route, path, copy, bool(body.get("stream")))

    @staticmethod
    def attach(copy: ShadowCopy | None, outcome: Outcome) -> None:
        """Keep the answer's bytes for ``copy`` (capture's, if it keeps them) and send the
        copy when the answer ends."""
        if copy is None:
            return
        if outcome.kept is None:
            outcome.kept = KeptAnswer(KEPT_BYTES)
        copy.kept = outcome.kept
        outcome.on_finish.append(copy.finished)

    def offer(self, copy: ShadowCopy) -> None:
        """Send the copy now in the background, or drop and count it (see the module)."""
        tenant = copy.route.tenant
        if len(self._tasks) >= self.max_in_flight:
            return self._count(tenant, BUSY)
        if self.forwarder.fair_queue.crowded(copy.route.base_fingerprint, copy.body):
            return self._count(tenant, BUSY)
        assert copy.kept is not None
        production = answer_texts(b"".join(copy.kept.chunks), copy.streamed)
        if copy.kept.over or production is None:
            return self._count(tenant, UNREADABLE)
        task = asyncio.get_running_loop().create_task(self._send(copy, production))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, copy: ShadowCopy, production: list[str]) -> None:
        tenant = copy.route.tenant
        try:
            candidate, usage = await self._ask_candidate(copy)
        except router.NoReplica:
            return self._count(tenant, BUSY)
        except (UpstreamFailure, *UpstreamError, ValueError) as exc:
            log.debug("shadow copy for %s failed: %r", copy.key, exc)
            self._book_of(copy).failed += 1
            return self._count(tenant, FAILED)
        except Exception:  # a task's error would otherwise surface only at its collection
            log.exception("shadow copy for %s failed", copy.key)
            return self._count(tenant, FAILED)
        self._count(tenant, ANSWERED)
        self._meter(copy, usage)
        if self._book_pairs >= MAX_BOOK_PAIRS:
            return self._count(tenant, BOOK_FULL)
        self._book_of(copy).pairs.append((production, candidate))
        self._book_pairs += 1

    async def _ask_candidate(self, copy: ShadowCopy) -> tuple[list[str], TokenUsage | None]:
        """The candidate's answer texts and usage; raises when it gave none (status, body)."""
        target = copy.route.shadow
        assert target is not None
        candidates = self.replicas.candidates(copy.route.base_fingerprint, target.version.lora_name)
        self.forwarder.fair_queue.last_in_line(copy.body)
        status, content, engine = await self.forwarder.ask(candidates, copy.path, copy.body)
        if status != 200:
            raise ValueError(f"the candidate's engine answered HTTP {status}")
        texts = answer_texts(content, streamed=False)
        if texts is None:
            raise ValueError("the candidate's answer holds no choices")
        engine.served(target.version.lora_name)
        return texts, TokenUsage.of(orjson.loads(content))

    def _book_of(self, copy: ShadowCopy) -> ShadowBatch:
        batch = self._book.get(copy.key)
        if batch is None:
            tenant_id, adapter, candidate, production = copy.key
            batch = self._book[copy.key] = ShadowBatch(tenant_id, adapter, candidate, production)
            self._tenant_names[copy.key] = copy.route.tenant
        return batch

    def _meter(self, copy: ShadowCopy, usage: TokenUsage | None) -> None:
        if usage is None:
            return
        batch = self._book_of(copy)
        batch.prompt_tokens += usage.prompt_tokens
        batch.completion_tokens += usage.completion_tokens
        self.metrics.shadow_tokens_of(copy.route.tenant, "prompt").inc(usage.prompt_tokens)
        self.metrics.shadow_tokens_of(copy.route.tenant, "completion").inc(usage.completion_tokens)

    def _count(self, tenant: str, outcome: str, count: int = 1) -> None:
        self.metrics.shadow_copies_of(tenant, outcome).inc(count)

    async def run(self, every: float = FLUSH_EVERY) -> None:
        """Write the book every ``every`` seconds, for the gateway's lifetime."""
        while True:
            await asyncio.sleep(every)
            await self.flush()

    async def flush(self) -> None:
        """Write what the book holds now; a batch that cannot be written is dropped, counted."""
        book, names = self._book, self._tenant_names
        self._book, self._tenant_names, self._book_pairs = {}, {}, 0
        for key, batch in book.items():
            try:
                await asyncio.to_thread(self.store.add, batch)
            except Exception:
                log.exception("could not record %d shadow comparisons; dropped", len(batch.pairs))
                self._count(names[key], WRITE_FAILED, len(batch.pairs))

    def cancel(self) -> None:
        """Abandon the copies still out (the gateway is stopping)."""
        for task in self._tasks:
            task.cancel()


def answer_texts(data: bytes, streamed: bool) -> list[str] | None:
    """The text of each choice of an answer (chat or completions; whole or as the events
    of a stream), in choice order; None when it is not an answer with choices."""
    try:
        if not streamed:
            payload = orjson.loads(data)
            choices = payload.get("choices") if isinstance(payload, dict) else None
            if not isinstance(choices, list) or not choices:
                return None
            return [_text(c.get("message") or c) for c in choices if isinstance(c, dict)]
        texts: dict[int, str] = {}
        for chunk in stream_chunks(data):
            for part in chunk["choices"]:
                if isinstance(part, dict):
                    index = part.get("index", 0)
                    texts[index] = texts.get(index, "") + _text(part.get("delta") or part)
    except ValueError:
        return None
    return [texts[i] for i in sorted(texts)] or None


def _text(part: Any) -> str:
    """A choice's text: a chat message's (or delta's) ``content``, a completion's ``text``."""
    if not isinstance(part, dict):
        return ""
    value = part.get("content", part.get("text"))
    return value if isinstance(value, str) else ""
