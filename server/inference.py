"""The OpenAI inference routes: authenticate, resolve, limit, place, forward.

Each request goes through the same five steps:

1. the API key maps to one tenant (admin keys are refused here);
2. ``model`` resolves to the base or to one of the tenant's adapter versions
   (alias, canary split, pin); anything else is the same 404;
3. the tenant's noisy-neighbour limits admit it or answer 429;
4. the router orders the healthy replicas of the version's base;
5. the proxy forwards it and relays the answer, with usage accounted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import Receive, Scope, Send

import router
from server import proxy
from server.engine import Engine
from server.errors import APIError, model_not_found, unhandled
from server.tenancy import Caller

if TYPE_CHECKING:
    from server.app import Gateway

CHARS_PER_TOKEN_ESTIMATE = 3
"""Prompt tokens are charged up front as characters / 3 (settled with the engine's count)."""

Reply = Callable[[Scope, Receive, Send], Awaitable[None]]
"""An answer, as a small ASGI app (a response object, ``proxy.Answer`` or ``proxy.Relay``)."""


async def authenticate(gateway: Gateway, header: str) -> Caller:
    """The tenant behind an ``Authorization`` header value, or the 401/403 APIError."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(
            401,
            "Missing API key: send `Authorization: Bearer <key>` with a tenant key.",
            code="invalid_api_key",
        )
    caller = await gateway.tenancy.caller(token.strip())
    if caller is None:
        raise APIError(401, "Incorrect or revoked API key provided.", code="invalid_api_key")
    if not isinstance(caller, Caller):
        raise APIError(
            403,
            "Admin keys cannot be used for inference; use a tenant's key.",
            code="admin_key_not_allowed",
        )
    return caller


async def resolve(
    gateway: Gateway, caller: Caller, body: dict[str, Any]
) -> tuple[proxy.Target, str]:
    """The engine-side target of ``body['model']`` and the base it must run on."""
    model = body["model"]
    tenant = caller.tenant_name
    try:
        ref = router.parse_model_name(model, {gateway.base_name})
    except router.InvalidModelName:
        raise model_not_found(model) from None
    if ref.kind is router.RefKind.BASE:
        return proxy.Target(model, gateway.base_name, tenant=tenant), gateway.base_fingerprint
    if ref.kind is router.RefKind.ENGINE:
        raise model_not_found(model)  # engine-side names are never for clients
    view = await gateway.tenancy.routing(caller.tenant_id, ref.name)
    if view is None:
        raise model_not_found(model)
    user = body.get("user")
    sticky = user if isinstance(user, str) and user else f"key:{caller.principal.key_id}"
    try:
        choice = router.choose_version(view, ref, sticky)
    except router.NoServableVersion:
        raise model_not_found(model) from None
    version = choice.version
    target = proxy.Target(
        model,
        version.engine_name,
        tenant=tenant,
        adapter=ref.name,
        version=str(version.number),
        label=choice.label,
    )
    return target, version.base_fingerprint


def estimate_tokens(body: dict[str, Any], settings_max: int) -> int:
    """Upper-bound-ish token ask of a request, for the token bucket and length cap."""
    prompt = body.get("messages", body.get("prompt", ""))
    text = prompt if isinstance(prompt, str) else orjson.dumps(prompt)
    completion = body.get("max_completion_tokens") or body.get("max_tokens") or settings_max
    return math.ceil(len(text) / CHARS_PER_TOKEN_ESTIMATE) + int(completion) * int(body.get("n", 1))


async def admit(gateway: Gateway, caller: Caller, body: dict[str, Any]) -> router.Admission:
    limits = await gateway.tenancy.limits(caller.tenant_id)
    asked = estimate_tokens(body, gateway.settings.max_tokens_limit)
    decision = gateway.limiter.check(str(caller.tenant_id), limits, asked, time.monotonic())
    if isinstance(decision, router.Admission):
        return decision
    if decision.retry_after_seconds is None:
        raise APIError(400, decision.message, code=f"{decision.reason.value}_exceeded")
    retry_after = max(1, math.ceil(decision.retry_after_seconds))
    raise APIError(
        429,
        decision.message,
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_after)},
    )


def place(gateway: Gateway, base_fingerprint: str, target: proxy.Target) -> list[Engine]:
    adapter = target.engine_model if target.adapter else None
    try:
        return gateway.placer.candidates(gateway.engines, base_fingerprint, adapter)
    except router.NoReplica:
        raise proxy.UpstreamFailure(
            503,
            "No healthy engine serves this model's base right now; retry in a few seconds.",
            "no_engine",
            retry_after=5,
        ) from None


async def serve(gateway: Gateway, path: str, scope: Scope, receive: Receive, send: Send) -> None:
    """ASGI entry of an inference route: the answer, or the error in OpenAI's shape.

    The gateway app calls this before its framework routing and middleware,
    which cost more CPU than the rest of the request on the hot path.
    """
    try:
        reply = await handle(gateway, path, scope, receive)
    except APIError as exc:
        reply = exc.response()
    except Exception as exc:
        reply = unhandled(exc).response()
    await reply(scope, receive, send)


def request_headers(scope: Scope) -> tuple[str, str]:
    """(authorization, content-length) from the ASGI scope (names arrive lower-cased)."""
    authorization = length = b""
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value
        elif name == b"content-length":
            length = value
    return authorization.decode("latin-1"), length.decode("latin-1")


async def handle(gateway: Gateway, path: str, scope: Scope, receive: Receive) -> Reply:
    """One OpenAI inference request, start to finish."""
    settings = gateway.settings
    started = time.perf_counter()
    authorization, declared = request_headers(scope)
    caller = await authenticate(gateway, authorization)
    body = await read_json(receive, declared, settings.max_request_bytes)
    check_bounds(body, settings.max_tokens_limit)
    target, base_fingerprint = await resolve(gateway, caller, body)
    admission = await admit(gateway, caller, body)

    outcome = proxy.Outcome()
    outcome.on_finish.append(
        lambda o: gateway.finished(path, target, caller, admission, o, started)
    )
    try:
        candidates = place(gateway, base_fingerprint, target)
        body["model"] = target.engine_model
        wants_stream = bool(body.get("stream"))
        options = body.get("stream_options") or {}
        if wants_stream:
            body["stream_options"] = {**options, "include_usage": True}
        upstream, engine = await open_upstream(gateway, candidates, path, body)
    except APIError as exc:
        outcome.status, outcome.error = exc.status, getattr(exc, "reason", "")
        outcome.finish()
        raise
    engine.in_flight += 1
    outcome.on_finish.append(lambda _: _release(engine, target, outcome))
    if upstream.status != 200:
        outcome.status = upstream.status
        outcome.finish()
        return await proxy.error_from_engine(upstream, target)
    if wants_stream:
        return proxy.stream(upstream, target, outcome, engine, bool(options.get("include_usage")))
    try:
        return await proxy.complete(upstream, target, outcome)
    except proxy.UpstreamError as exc:
        failure = proxy.classify(exc, engine)
        outcome.status, outcome.error = failure.status, failure.reason
        raise failure from exc
    except ValueError as exc:  # a 200 whose body is not JSON
        outcome.status, outcome.error = 502, "engine_error"
        raise proxy.UpstreamFailure(
            502, "The model engine answered with a malformed body.", "engine_error"
        ) from exc
    finally:
        outcome.finish()  # idempotent; settles the tenant's limits on every path


def _release(engine: Engine, target: proxy.Target, outcome: proxy.Outcome) -> None:
    engine.in_flight -= 1
    if target.adapter and outcome.status == 200 and not outcome.error:
        engine.served(target.engine_model)


async def open_upstream(
    gateway: Gateway, candidates: list[Engine], path: str, body: dict[str, Any]
) -> tuple[proxy.Upstream, Engine]:
    """Send to the first engine that answers; fail over while no response has started."""
    assert gateway.client is not None
    last: proxy.UpstreamFailure | None = None
    for engine in candidates:
        try:
            key = gateway.settings.ensure_engine_key()
            upstream = await proxy.send(gateway.client, gateway.pool, engine, path, body, key)
            gateway.metrics.engine_requests_of(engine.name).inc()
            return upstream, engine
        except proxy.UpstreamFailure as failure:
            gateway.metrics.upstream_errors_of(engine.name, failure.reason).inc()
            last = failure
            if failure.status == 504:
                break  # a timed-out generation is not repeated elsewhere: it would double the wait
            # No response has started, so nothing reached the client yet: an inference
            # request has no side effects and can go to the next replica.
            engine.healthy = False  # the next health check readmits it
    assert last is not None
    raise last


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
