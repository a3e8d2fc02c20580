"""Errors in OpenAI's shape.

Every error a client sees is ``{"error": {"message", "type", "param", "code"}}``
with a precise message, so the official ``openai`` SDK raises the matching
exception class (``NotFoundError``, ``RateLimitError``...).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import exc as sql

# HTTP status -> OpenAI error "type"; the SDK keys its exceptions on the status.
log = logging.getLogger("loraplex.gateway")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error to return to the client as an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, code=self.code, param=self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code,
        }
    }


def model_not_found(model: str) -> APIError:
    """The one 404 for every name a caller may not use: unknown, foreign, retired, engine-side.

    The body depends only on the requested string, so it reveals nothing
    about whether some other tenant owns that name.
    """
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


REGISTRY_DOWN = (sql.OperationalError, sql.InterfaceError, sql.TimeoutError)
"""What the database driver raises while the registry database is down, restarting or
out of connections: a retryable condition, not a bug in the gateway."""


def registry_unavailable() -> APIError:
    return APIError(
        503,
        "The registry database is unavailable right now; retry in a few seconds.",
        code="registry_unavailable",
        headers={"Retry-After": "2"},
    )


def unhandled(exc: Exception) -> APIError:
    """The answer to an exception no route turned into an ``APIError``: a retryable 503
    while the registry database is down, otherwise a logged 500."""
    if isinstance(exc, REGISTRY_DOWN):
        log.warning("registry database unavailable: %s", type(exc).__name__)
        return registry_unavailable()
    log.exception("unhandled error", exc_info=exc)
    return APIError(500, "Internal error in the gateway; it has been logged.")


async def _api_error_response(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def unhandled_response(_: Request, exc: Exception) -> Response:
    return unhandled(exc).response()


def install_api_error_handler(app: FastAPI) -> None:
    """Answer every ``APIError`` raised in ``app`` with its OpenAI-shaped body, and a
    database outage with a retryable 503."""
    app.add_exception_handler(APIError, _api_error_response)
    for error in REGISTRY_DOWN:
        app.add_exception_handler(error, unhandled_response)
