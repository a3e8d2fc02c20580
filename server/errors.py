"""Errors in OpenAI's shape.

Every error a client sees is ``{"error": {"message", "type", "param", "code"}}``
with a precise message, so the official ``openai`` SDK raises the matching
exception class (``NotFoundError``, ``RateLimitError``...).

Routes raise ``APIError`` for what they check themselves and let the registry's
errors, blob-store failures and database outages propagate: the handlers
``install_api_error_handler`` installs answer each in one place.
"""

from __future__ import annotations

import logging
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import registry

log = logging.getLogger("loraplex.gateway")

# HTTP status -> OpenAI error "type"; the SDK keys its exceptions on the status.
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


def bearer_token(header: str) -> str:
    """The key in an ``Authorization: Bearer <key>`` header value, else the one 401 for a
    missing or malformed key (the same on the REST and inference routes)."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(
            401,
            "Missing or malformed API key: send `Authorization: Bearer <key>`.",
            code="invalid_api_key",
        )
    return token.strip()


def incorrect_api_key() -> APIError:
    """The 401 for a well-formed key that is unknown or revoked (which of the two is not said)."""
    return APIError(401, "Incorrect or revoked API key provided.", code="invalid_api_key")


_REGISTRY_STATUS: list[tuple[type[registry.RegistryError], int, str]] = [
    (registry.NotFound, 404, "not_found"),
    (registry.AdapterRejected, 422, "adapter_rejected"),
    (registry.GateFailed, 409, "gate_failed"),
    (registry.Conflict, 409, "conflict"),
    (registry.PermissionDenied, 403, "permission_denied"),
    (registry.InvalidLimits, 400, "invalid_limits"),
    (registry.InvalidRequest, 400, "invalid_request"),
    (registry.CorruptBlob, 500, "corrupt_blob"),
]
"""Status and code of each registry error, most specific first (a subclass before its base)."""


def registry_error(exc: registry.RegistryError) -> APIError:
    """The OpenAI-shaped error for a registry exception: its message says what to do next."""
    for kind, status, code in _REGISTRY_STATUS:
        if isinstance(exc, kind):
            return APIError(status, str(exc), code=code)
    return APIError(500, str(exc), code="registry_error")


BLOB_STORE_DOWN = (BotoCoreError, ClientError)
"""What the S3 blob store raises when S3 is down or refuses a registry call."""


def blob_store_unavailable(exc: Exception) -> APIError:
    # The exception text names internal endpoints and buckets: only its class is returned.
    return APIError(
        503,
        f"The adapter store is unavailable right now ({type(exc).__name__}); "
        "nothing changed, retry in a few seconds.",
        code="blob_store_unavailable",
        headers={"Retry-After": "5"},
    )


REGISTRY_DOWN = registry.DATABASE_DOWN
"""What the database driver raises while the registry database is down (retryable)."""


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


def api_error(request: Request, exc: Exception) -> APIError:
    """The OpenAI-shaped answer to any exception a route lets out."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, registry.RegistryError):
        return registry_error(exc)
    if isinstance(exc, BLOB_STORE_DOWN):
        log.warning("blob store failed in %s %s: %r", request.method, request.url.path, exc)
        return blob_store_unavailable(exc)
    return unhandled(exc)


async def _api_error_response(request: Request, exc: Exception) -> Response:
    return api_error(request, exc).response()


async def unhandled_response(_: Request, exc: Exception) -> Response:
    return unhandled(exc).response()


ANSWERED = (APIError, registry.RegistryError, *BLOB_STORE_DOWN, *REGISTRY_DOWN)
"""The exceptions ``install_api_error_handler`` answers (anything else is a logged 500)."""


def install_api_error_handler(app: FastAPI) -> None:
    """Answer every ``APIError``, registry error, blob-store failure and database outage
    raised in ``app`` with its OpenAI-shaped body (and ``Retry-After`` where retrying helps)."""
    for error in ANSWERED:
        app.add_exception_handler(error, _api_error_response)
