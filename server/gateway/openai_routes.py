"""The OpenAI routes as FastAPI sees them: the two inference paths and ``/v1/models``.

Requests to the inference paths reach ``GatewayApp.hot_routes`` first; FastAPI still
lists them in the docs, and answers them the same way when the app is mounted under
another one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.config import Settings
from server.gateway import openapi
from server.gateway.accounting import CHAT, COMPLETIONS
from server.gateway.inference import Inference, Reply
from server.gateway.tenancy import Tenancy


def add(
    app: FastAPI,
    inference: Inference,
    tenancy: Tenancy,
    bases: Mapping[str, str],
    settings: Settings,
) -> dict[str, ASGIApp]:
    """Add the routes to ``app``; the hot routes, by path, for ``GatewayApp.hot_routes``.

    ``bases`` maps each served base's name to its fingerprint (``Replicas.bases``, live).
    """
    created = int(time.time())

    async def chat_completions(request: Request) -> Response:
        return as_response(await inference.handle(CHAT, request.scope, request.receive))

    async def completions(request: Request) -> Response:
        return as_response(await inference.handle(COMPLETIONS, request.scope, request.receive))

    async def models(request: Request) -> dict[str, Any]:
        caller = await tenancy.authenticate(request.headers.get("authorization", ""))
        adapters = await tenancy.servable_adapters(caller.tenant_id)
        content = inference.resolver.content
        routed = await content.names(caller.tenant_id) if content is not None else []
        return {"object": "list", "data": model_list(bases, adapters, created, routed)}

    # Request-body schemas for the docs and the fuzzer only: nothing validates against them.
    base_name, limit = settings.resolved_served_model_name, settings.max_tokens_limit
    chat_body = openapi.chat_completions_body(base_name, limit)
    app.add_api_route(CHAT, chat_completions, methods=["POST"], openapi_extra=chat_body)
    completions_body = openapi.completions_body(base_name, limit)
    app.add_api_route(COMPLETIONS, completions, methods=["POST"], openapi_extra=completions_body)
    app.add_api_route("/v1/models", models, methods=["GET"])
    return {
        CHAT: partial(inference.serve, CHAT),
        COMPLETIONS: partial(inference.serve, COMPLETIONS),
    }


def model_list(
    bases: Mapping[str, str],
    adapters: list[tuple[str, str]],
    created: int,
    routed: list[str] | None = None,
) -> list[dict[str, Any]]:
    """``/v1/models``'s entries: every served base, then each of the caller's adapters whose
    base is served, with ``parent`` and ``root`` naming that base as vLLM's own list does,
    then the caller's routed models (no one base: no parent, their own root)."""
    name_of = {fingerprint: name for name, fingerprint in bases.items()}
    entries: list[tuple[str, str | None]] = [(name, None) for name in sorted(bases)]
    entries += [(a, name_of[fp]) for a, fp in adapters if fp in name_of]
    entries += [(name, None) for name in routed or []]
    return [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "loraplex",
            "root": parent or name,
            "parent": parent,
        }
        for name, parent in entries
    ]


def as_response(reply: Reply) -> Response:
    """A hot-path reply wrapped for a FastAPI endpoint (the hot path itself sends it directly)."""
    if isinstance(reply, Response):
        return reply
    return _ASGIResponse(reply)


class _ASGIResponse(Response):
    """A Starlette response that defers to any ASGI app; FastAPI returns it as is."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.reply(scope, receive, send)
