"""Capture: a tenant's chat completions stored after their answers, never in their way.

A chat request is captured when its tenant has capture on (``registry.captures``, cached
like the tenant's limits) and the request says ``store: true`` (or omits ``store`` and
the tenant stores by default). Until the answer ends the only work is keeping the bytes
the client gets (``proxy.KeptAnswer``, bounded by the tenant's ``max_body_bytes``); then
the request and the answer join a bounded in-memory queue, and a background task writes
them in a worker thread (streams assembled there into one ``chat.completion``). When the
queue is full, or a body is over the limit, or the write fails, the capture is dropped
and counted (``loraplex_capture_dropped_total``): the answer never waits for it.

Requests whose tenant has capture off cost one cached lookup; ``/v1/completions`` none.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from registry.captures import CaptureSettings, CaptureStore, NewCompletion, metadata_problem
from server.errors import APIError
from server.gateway.accounting import CHAT
from server.gateway.metrics import Metrics
from server.gateway.proxy import KeptAnswer, Outcome, TokenUsage
from server.gateway.resolution import Route
from server.gateway.tenancy import MISS, REGISTRY_MAX_AGE, REGISTRY_TTL, Caller, TTLCache

log = logging.getLogger("loraplex.capture")

QUEUE_ITEMS = 2048
"""Captures waiting to be written, at most; past it new ones are dropped."""
QUEUE_BYTES = 64 << 20
"""Bytes (requests and answers) waiting to be written, at most."""
BATCH = 128
"""Captures one write (one worker-thread hop, one transaction) takes."""
PURGE_EVERY = 3600.0
"""Seconds between retention purges."""

QUEUE_FULL = "queue_full"
TOO_LARGE = "too_large"
UNREADABLE = "unreadable"
DUPLICATE = "duplicate"
WRITE_FAILED = "write_failed"


@dataclass(slots=True)
class Pending:
    """One request being answered that is to be captured once its answer ends."""

    capture: Capture
    tenant_id: int
    route: Route
    request: dict[str, Any]
    """The body as the client sent it (a shallow copy: the engine's gets rewritten)."""
    request_bytes: int
    """Its declared size (0 when undeclared: then checked once written out)."""
    kept: KeptAnswer
    usage: TokenUsage | None = None

    def finished(self, outcome: Outcome) -> None:
        """``Outcome.on_finish`` callback: a whole, successful answer joins the queue."""
        if outcome.status == 200 and not outcome.error:
            self.usage = outcome.usage
            self.capture.offer(self)

    @property
    def size(self) -> int:
        return self.request_bytes + self.kept.size


class Capture:
    """The gateway's capture: which requests to keep, the queue, and its writer."""

    def __init__(
        self,
        store: CaptureStore,
        metrics: Metrics,
        ttl: float = REGISTRY_TTL,
        max_age: float = REGISTRY_MAX_AGE,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self._settings = TTLCache(self._load_settings, ttl, max_age)
        self._queue: deque[Pending] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()

    async def _load_settings(self, tenant_id: int) -> CaptureSettings:
        return await asyncio.to_thread(self.store.settings, tenant_id)

    async def begin(
        self, path: str, caller: Caller, route: Route, body: dict[str, Any], declared: str
    ) -> Pending | None:
        """The capture of this request if it is to be stored, else None; a 400 for a bad
        ``store`` or ``metadata`` (checked whether or not the tenant captures)."""
        if path != CHAT:
            return None
        store = body.get("store")
        if store is not None and not isinstance(store, bool):
            raise APIError(400, "`store` must be true or false.", param="store")
        if "metadata" in body and body["metadata"] is not None:
            problem = metadata_problem(body["metadata"])
            if problem is not None:
                raise APIError(400, problem, param="metadata")
        settings = await self._settings_of(caller.tenant_id)
        if settings is None or not settings.enabled:
            return None
        if not (settings.store_by_default if store is None else store):
            return None
        declared_bytes = int(declared) if declared.isdigit() else 0
        if declared_bytes > settings.max_body_bytes:
            self.dropped(route.tenant, TOO_LARGE)
            return None
        kept = KeptAnswer(settings.max_body_bytes)
        return Pending(self, caller.tenant_id, route, dict(body), declared_bytes, kept)

    async def _settings_of(self, tenant_id: int) -> CaptureSettings | None:
        hit = self._settings.fresh(tenant_id)
        if hit is not MISS:
            return hit
        try:
            return await self._settings.load(tenant_id)
        except Exception as exc:  # the answer goes on; only its capture is lost
            log.warning("capture settings unavailable; not capturing: %r", exc)
            return None

    def offer(self, pending: Pending) -> None:
        """Queue a finished capture, or drop and count it (over its limit, queue full)."""
        if pending.kept.over:
            self.dropped(pending.route.tenant, TOO_LARGE)
        elif len(self._queue) >= QUEUE_ITEMS or self._queued_bytes + pending.size > QUEUE_BYTES:
            self.dropped(pending.route.tenant, QUEUE_FULL)
        else:
            self._queue.append(pending)
            self._queued_bytes += pending.size
            self._wake.set()

    def dropped(self, tenant: str, reason: str, count: int = 1) -> None:
        self.metrics.capture_dropped_of(tenant, reason).inc(count)

    async def run(self) -> None:
        """Write queued captures as they come, for the gateway's lifetime."""
        self._wake = asyncio.Event()  # of this loop: an app may be started more than once
        if self._queue:
            self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write everything queued now."""
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            self._queued_bytes -= sum(p.size for p in batch)
            try:
                saved, dropped = await asyncio.to_thread(self._write, batch)
            except Exception:
                log.exception("could not store %d captured completions; dropped", len(batch))
                saved, dropped = (
                    Counter[str](),
                    Counter((p.route.tenant, WRITE_FAILED) for p in batch),
                )
            for tenant, count in saved.items():
                self.metrics.captured_of(tenant).inc(count)
            for (tenant, reason), count in dropped.items():
                self.dropped(tenant, reason, count)

    def _write(self, batch: list[Pending]) -> tuple[Counter[str], Counter[tuple[str, str]]]:
        """(stored per tenant, dropped per tenant and reason); runs in a worker thread."""
        records: dict[int, str] = {}  # id(record) -> its tenant's name, for the counts
        dropped: Counter[tuple[str, str]] = Counter()
        made = []
        for pending in batch:
            reason, record = completion_record(pending)
            if record is None:
                dropped[(pending.route.tenant, reason)] += 1
            else:
                made.append(record)
                records[id(record)] = pending.route.tenant
        skipped = {id(record) for record in self.store.save(made)}
        saved = Counter(records[id(r)] for r in made if id(r) not in skipped)
        dropped.update((records[key], DUPLICATE) for key in skipped)
        return saved, dropped

    async def purge_expired(self, every: float = PURGE_EVERY) -> None:
        """Delete records past their tenant's retention, now and every ``every`` seconds."""
        while True:
            try:
                removed = await asyncio.to_thread(self.store.purge)
                if removed:
                    log.info("deleted %d stored completions past their retention", removed)
            except Exception:
                log.exception("retention purge of stored completions failed; will retry")
            await asyncio.sleep(every)


def completion_record(pending: Pending) -> tuple[str, NewCompletion | None]:
    """The record to store for ``pending``, or why there is none ('' when there is one)."""
    limit = pending.kept.limit
    if not pending.request_bytes and len(orjson.dumps(pending.request)) > limit:
        return TOO_LARGE, None
    data = b"".join(pending.kept.chunks)
    try:
        if pending.request.get("stream"):
            response = assemble_stream(data, pending.usage)
        else:
            response = orjson.loads(data)
    except ValueError:
        return UNREADABLE, None
    if not isinstance(response, dict):
        return UNREADABLE, None
    completion_id = response.get("id")
    # The id may be a client's own ``request_id``: PostgreSQL could not store a NUL in it.
    if not isinstance(completion_id, str) or not 0 < len(completion_id) <= 256:
        return UNREADABLE, None
    if "\x00" in completion_id:
        return UNREADABLE, None
    route, request, usage = pending.route, pending.request, pending.usage
    user = request.get("user")
    return "", NewCompletion(
        tenant_id=pending.tenant_id,
        completion_id=completion_id,
        model=route.requested_model,
        adapter=route.adapter_label,
        version=route.version.number if route.version else None,
        route=route.version.label if route.version else "",
        user=user.replace("\x00", "")[:256] if isinstance(user, str) else None,
        metadata=dict(request.get("metadata") or {}),
        stream=bool(request.get("stream")),
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        created_at=_created(response),
        request=request,
        response=response,
    )


def _created(response: dict[str, Any]) -> dt.datetime:
    created = response.get("created")
    if isinstance(created, int) and not isinstance(created, bool):
        return dt.datetime.fromtimestamp(created, dt.UTC)
    return dt.datetime.now(dt.UTC)


def assemble_stream(data: bytes, usage: TokenUsage | None) -> dict[str, Any] | None:
    """A streamed answer's events as the one ``chat.completion`` a plain request would have
    returned (None when they hold no chunk)."""
    head: dict[str, Any] | None = None
    choices: dict[int, dict[str, Any]] = {}
    for chunk in stream_chunks(data):
        head = head or chunk
        for part in chunk["choices"]:
            index = part.get("index", 0)
            choice = choices.setdefault(index, _empty_choice(index))
            _merge_delta(choice["message"], part.get("delta") or {})
            if part.get("finish_reason") is not None:
                choice["finish_reason"] = part["finish_reason"]
    if head is None:
        return None
    tokens = usage or TokenUsage()
    return {
        "id": head.get("id"),
        "object": "chat.completion",
        "created": head.get("created"),
        "model": head.get("model"),
        "choices": [choices[i] for i in sorted(choices)],
        "usage": {
            "prompt_tokens": tokens.prompt_tokens,
            "completion_tokens": tokens.completion_tokens,
            "total_tokens": tokens.prompt_tokens + tokens.completion_tokens,
        },
        "system_fingerprint": head.get("system_fingerprint"),
    }


def stream_chunks(data: bytes) -> Iterator[dict[str, Any]]:
    """The chunks (objects with a ``choices`` list) of a streamed answer's events, in order;
    ValueError if an event's data is not JSON."""
    for event in data.split(b"\n\n"):
        event = event.strip()
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            continue
        chunk = orjson.loads(event[6:])
        if isinstance(chunk, dict) and isinstance(chunk.get("choices"), list):
            yield chunk


def _empty_choice(index: int) -> dict[str, Any]:
    message = {"role": "assistant", "content": None}
    return {"index": index, "message": message, "finish_reason": None, "logprobs": None}


def _merge_delta(message: dict[str, Any], delta: dict[str, Any]) -> None:
    """Add one chunk's delta to the message so far: text fields concatenated."""
    for key, value in delta.items():
        if key == "role" and isinstance(value, str):
            message["role"] = value
        elif key == "tool_calls" and isinstance(value, list):
            _merge_tool_calls(message.setdefault("tool_calls", []), value)
        elif isinstance(value, str):
            message[key] = (message.get(key) or "") + value
        elif value is not None:
            message[key] = value


def _merge_tool_calls(calls: list[dict[str, Any]], parts: list[Any]) -> None:
    for part in parts:
        if not isinstance(part, dict):
            continue
        index = part.get("index", 0)
        while len(calls) <= index:
            calls.append(
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
        call = calls[index]
        if part.get("id"):
            call["id"] = part["id"]
        function = part.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""
