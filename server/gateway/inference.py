"""The OpenAI inference routes: authenticate, resolve, limit, place, forward.

Each request goes through the same five steps, each owned by one object:

1. the API key maps to one tenant, admin keys refused (``tenancy.Tenancy``);
2. the tenant's noisy-neighbour limits admit it or answer 429 (``accounting.Accounting``);
3. ``model`` resolves to the base, to one of the tenant's adapter versions, or through one
   of its routed models to one of those (``resolution.Resolver``); anything else is the
   same 404, and its admission is given back;
4. the router orders the healthy replicas of the version's base (``replicas.Replicas``),
   and it waits its turn at them if its tenant's or their in-flight tokens are full
   (``fair_queue.FairGate``);
5. the first replica that takes it answers (``forwarding.Forwarder``), and the answer is
   relayed (``proxy``), with usage and metrics accounted when it ends (and, after it, the
   request stored by ``capture`` and copied to a shadow candidate by ``shadow``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

import router
from server.errors import APIError, unhandled
from server.gateway import proxy
from server.gateway.accounting import Accounting
from server.gateway.capture import Capture
from server.gateway.drift import DriftBook
from server.gateway.forwarding import Forwarder
from server.gateway.replicas import Engine, Replicas
from server.gateway.resolution import NO_ENGINE, Resolver, Route
from server.gateway.shadow import Shadow
from server.gateway.tenancy import Tenancy

Reply = Callable[[Scope, Receive, Send], Awaitable[None]]
"""An answer, as a small ASGI app (a response object, ``proxy.Answer`` or ``proxy.Relay``)."""


@dataclass
class Inference:
    """The inference routes and exactly what they use."""

    tenancy: Tenancy
    resolver: Resolver
    accounting: Accounting
    replicas: Replicas
    forwarder: Forwarder
    max_request_bytes: int
    """Largest request body accepted (413 above it)."""
    max_tokens_limit: int
    """Largest ``max_tokens`` accepted (400 above it)."""
    capture: Capture
    """Which chat completions are stored, after their answers (``capture.Capture``)."""
    drift: DriftBook
    """Where the prompts routed to adapters are kept for their drift sketches."""
    shadow: Shadow
    """Which production requests a shadow candidate gets a copy of, after their answers."""

    async def serve(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry of an inference route: the answer, or the error in OpenAI's shape.

        The gateway app calls this before its framework routing and middleware,
        which cost more CPU than the rest of the request on the hot path.
        """
        try:
            reply = await self.handle(path, scope, receive)
        except APIError as exc:
            reply = exc.response()
        except Exception as exc:
            reply = unhandled(exc).response()
        await reply(scope, receive, send)

    async def handle(self, path: str, scope: Scope, receive: Receive) -> Reply:
        """One OpenAI inference request, start to finish."""
        started = time.perf_counter()
        authorization, declared = request_headers(scope)
        caller = await self.tenancy.authenticate(authorization)
        body = await read_json(receive, declared, self.max_request_bytes)
        check_bounds(body, self.max_tokens_limit)
        limits = await self.tenancy.limits(caller.tenant_id)
        # Admitted before resolving: a routed model's classifier is an engine call, which
        # a tenant over its limits must not get for free.
        admission = await self.accounting.admit(caller, limits, body)
        try:
            route = await self.resolver.resolve(caller, body)
            capture = await self.capture.begin(path, caller, route, body, declared)
        except BaseException:
            self.accounting.release(admission)
            raise
        copy = self.shadow.begin(path, caller, route, body) if route.shadow else None
        self.drift.offer(caller.tenant_id, route, body)

        outcome = proxy.Outcome()
        outcome.on_finish.append(
            lambda o: self.accounting.finished(path, route, caller, admission, o, started)
        )
        if capture is not None:
            outcome.kept = capture.kept
            outcome.on_finish.append(capture.finished)
        self.shadow.attach(copy, outcome)
        try:
            wants_stream, options = _engine_body(body, route)
            candidates = self._candidates(route)
            seat = await self.forwarder.fair_queue.enter(
                route.tenant, route.base_fingerprint, len(candidates), body, receive
            )
            outcome.on_finish.append(lambda _: seat.release())
            if seat.waited:  # health and load may have changed meanwhile
                candidates = self._candidates(route)
            upstream, engine = await self.forwarder.open(candidates, path, body)
        except BaseException as exc:  # cancelled included: nothing it holds may leak
            outcome.status, outcome.error = getattr(exc, "status", 500), getattr(exc, "reason", "")
            outcome.finish()
            raise
        engine.in_flight += 1
        outcome.on_finish.append(lambda _: _release(engine, route, outcome))
        if upstream.status != 200:
            outcome.status = upstream.status
            outcome.finish()
            return await proxy.error_from_engine(upstream, route)
        if wants_stream:
            return proxy.stream(upstream, route, outcome, bool(options.get("include_usage")))
        return await _complete(upstream, route, outcome)

    def _candidates(self, route: Route) -> list[Engine]:
        try:
            return self.replicas.candidates(route.base_fingerprint, route.lora_name)
        except router.NoReplica:
            raise proxy.UpstreamFailure(503, NO_ENGINE, "no_engine", retry_after=5) from None


def _engine_body(body: dict[str, Any], route: Route) -> tuple[bool, dict[str, Any]]:
    """Rewrite ``body`` for the engine in place; (whether it streams, the client's options)."""
    body["model"] = route.engine_model
    wants_stream = bool(body.get("stream"))
    options = body.get("stream_options") or {}
    if wants_stream:
        # Always asked of the engine, for billing; dropped again unless the client asked.
        body["stream_options"] = {**options, "include_usage": True}
    return wants_stream, options


async def _complete(upstream: proxy.Upstream, route: Route, outcome: proxy.Outcome) -> Reply:
    try:
        return await proxy.complete(upstream, route, outcome)
    except proxy.UpstreamError as exc:
        failure = proxy.classify(exc)
        outcome.status, outcome.error = failure.status, failure.reason
        raise failure from exc
    except ValueError as exc:  # a 200 whose body is not JSON
        outcome.status, outcome.error = 502, "engine_error"
        raise proxy.UpstreamFailure(
            502, "The model engine answered with a malformed body.", "engine_error"
        ) from exc
    finally:
        outcome.finish()  # idempotent; settles the tenant's limits on every path


def _release(engine: Engine, route: Route, outcome: proxy.Outcome) -> None:
    engine.in_flight -= 1
    if route.lora_name and outcome.status == 200 and not outcome.error:
        engine.served(route.lora_name)


def request_headers(scope: Scope) -> tuple[str, str]:
    """(authorization, content-length) from the ASGI scope (names arrive lower-cased)."""
    authorization = length = b""
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value
        elif name == b"content-length":
            length = value
    return authorization.decode("latin-1"), length.decode("latin-1")


async def read_json(receive: Receive, declared: str, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, refusing bodies over ``limit`` bytes (413)."""
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body is {declared} bytes; the limit is {limit}.")
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise APIError(400, "The client disconnected before sending the whole body.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        body = orjson.loads(chunks[0] if len(chunks) == 1 else b"".join(chunks))
    except ValueError as exc:
        raise APIError(400, f"Request body is not valid JSON: {exc}.") from exc
    if not isinstance(body, dict):
        raise APIError(400, "Request body must be a JSON object.")
    return body


def check_bounds(body: dict[str, Any], max_tokens_limit: int) -> None:
    """Refuse what the gateway bounds itself: token counts, ``n``, field types."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise APIError(400, "`model` is required and must be a non-empty string.", param="model")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise APIError(400, f"`{name}` must be a positive integer.", param=name)
        if value > max_tokens_limit:
            raise APIError(
                400,
                f"`{name}` is {value}; this server allows at most {max_tokens_limit}.",
                param=name,
                code="max_tokens_exceeded",
            )
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 16:
        raise APIError(400, "`n` must be an integer from 1 to 16.", param="n")
    if not isinstance(body.get("stream", False), bool):
        raise APIError(400, "`stream` must be true or false.", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "`stream_options` must be an object.", param="stream_options")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise APIError(400, "`user` must be a string.", param="user")
