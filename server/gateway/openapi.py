"""OpenAPI request-body schemas for the OpenAI routes (documentation and fuzzing only).

The inference routes read raw JSON so the hot path pays for no validation
model; these schemas only describe the bodies in ``/openapi.json`` (through
FastAPI's ``openapi_extra``), for readers of the docs and for schemathesis.
They state the bounds the gateway itself enforces (``model``, ``max_tokens``,
``n``, ``stream``, ``user``, ``store``, ``metadata``) and leave everything else open,
as the engine validates it.
"""

from __future__ import annotations

from typing import Any

from registry.captures import MAX_METADATA_KEY, MAX_METADATA_PAIRS, MAX_METADATA_VALUE

MAX_N = 16
"""Largest ``n`` (choices per request) the gateway accepts; ``inference.check_bounds``."""

_ROLES = ["system", "developer", "user", "assistant", "tool"]
_KEY_PATTERN = r'^[^"\\\x00-\x1f]*$'
"""Metadata keys hold no quote, backslash or control character (``registry.captures``)."""


def _common(base_name: str, max_tokens_limit: int) -> dict[str, Any]:
    tokens = {"type": "integer", "minimum": 1, "maximum": max_tokens_limit}
    return {
        "model": {
            "type": "string",
            "minLength": 1,
            "description": "The base's name, an adapter name, `name@N` or `name:alias`.",
            "examples": [base_name],
        },
        "max_tokens": tokens,
        "n": {"type": "integer", "minimum": 1, "maximum": MAX_N},
        "stream": {"type": "boolean"},
        "stream_options": {
            "type": "object",
            "properties": {"include_usage": {"type": "boolean"}},
        },
        "user": {"type": "string", "description": "Sticky key for canary splits."},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "seed": {"type": "integer"},
        "stop": {
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
        },
    }


def _body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": required}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def completions_body(base_name: str, max_tokens_limit: int) -> dict[str, Any]:
    """``openapi_extra`` for ``POST /v1/completions``."""
    prompt = {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "minItems": 1},
        ],
    }
    return _body({**_common(base_name, max_tokens_limit), "prompt": prompt}, ["model", "prompt"])


def chat_completions_body(base_name: str, max_tokens_limit: int) -> dict[str, Any]:
    """``openapi_extra`` for ``POST /v1/chat/completions``."""
    message = {
        "type": "object",
        "properties": {
            "role": {"type": "string", "enum": _ROLES},
            "content": {"type": "string"},
            "name": {"type": "string"},
        },
        "required": ["role", "content"],
    }
    metadata = {
        "type": "object",
        "maxProperties": MAX_METADATA_PAIRS,
        "propertyNames": {"minLength": 1, "maxLength": MAX_METADATA_KEY, "pattern": _KEY_PATTERN},
        "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE},
        "description": "Tags for a stored completion (`store`): filter stored lists by them.",
    }
    properties = {
        **_common(base_name, max_tokens_limit),
        "messages": {"type": "array", "items": message, "minItems": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": max_tokens_limit},
        "store": {
            "type": "boolean",
            "description": "Store the request and answer (when the tenant's capture is on).",
        },
        "metadata": metadata,
    }
    return _body(properties, ["model", "messages"])
