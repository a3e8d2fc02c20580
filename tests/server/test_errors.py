"""Error mapping shared by every route: registry errors, blob-store and database outages."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import exc as sql

import registry
from server.errors import (
    REGISTRY_DOWN,
    APIError,
    bearer_token,
    incorrect_api_key,
    install_api_error_handler,
)


def _answer(raise_it: Callable[[], None]) -> tuple[int, dict[str, str], dict[str, object]]:
    """Status, headers and error body of a route that calls ``raise_it``, on an app with only
    the shared handlers installed."""
    app = FastAPI()
    install_api_error_handler(app)

    @app.get("/thing")
    def thing() -> None:
        raise_it()

    answer = TestClient(app, raise_server_exceptions=False).get("/thing")
    return answer.status_code, dict(answer.headers), answer.json()["error"]


def _raiser(exc: Exception) -> Callable[[], None]:
    def raise_it() -> None:
        raise exc

    return raise_it


@pytest.mark.parametrize("error", REGISTRY_DOWN)
def test_database_outage_is_a_retryable_503_in_openai_shape(error: type[Exception]) -> None:
    def outage() -> None:
        if error is sql.TimeoutError:
            raise sql.TimeoutError("QueuePool limit reached")
        raise error("SELECT 1", {}, OSError("connection refused"))

    status, headers, body = _answer(outage)
    assert status == 503
    assert headers["retry-after"] == "2"
    assert body["code"] == "registry_unavailable" and body["type"] == "service_unavailable"
    assert "connection refused" not in str(body)  # driver details stay in the log


REGISTRY_ERRORS = [
    (registry.NotFound("adapter 'bot' does not exist"), 404, "invalid_request_error", "not_found"),
    (
        registry.AdapterRejected(["no adapter_config.json"]),
        422,
        "invalid_request_error",
        "adapter_rejected",
    ),
    (registry.GateFailed(["accuracy 0.5 < 0.9"]), 409, "conflict_error", "gate_failed"),
    (registry.Conflict("alias in use"), 409, "conflict_error", "conflict"),
    (
        registry.PermissionDenied("override needs an admin"),
        403,
        "permission_error",
        "permission_denied",
    ),
    (
        registry.InvalidLimits("limits must be positive"),
        400,
        "invalid_request_error",
        "invalid_limits",
    ),
    (registry.InvalidRequest("weight above 1"), 400, "invalid_request_error", "invalid_request"),
    (registry.CorruptBlob("blobs/ab", "aa", "bb"), 500, "server_error", "corrupt_blob"),
    (registry.RegistryError("something new"), 500, "server_error", "registry_error"),
]


@pytest.mark.parametrize(
    ("exc", "status", "kind", "code"),
    REGISTRY_ERRORS,
    ids=[type(e[0]).__name__ for e in REGISTRY_ERRORS],
)
def test_each_registry_error_has_its_status_and_code_and_keeps_its_message(
    exc: registry.RegistryError, status: int, kind: str, code: str
) -> None:
    answered, _, body = _answer(_raiser(exc))
    assert answered == status
    assert body == {"message": str(exc), "type": kind, "param": None, "code": code}


@pytest.mark.parametrize(
    "exc",
    [
        EndpointConnectionError(endpoint_url="http://seaweed.internal:8333/secret-bucket"),
        ClientError({"Error": {"Code": "AccessDenied", "Message": "secret-bucket"}}, "PutObject"),
    ],
    ids=["BotoCoreError", "ClientError"],
)
def test_blob_store_failure_is_a_retryable_503_that_names_no_endpoint(exc: Exception) -> None:
    status, headers, body = _answer(_raiser(exc))
    assert (status, headers["retry-after"]) == (503, "5")
    assert body == {
        "message": f"The adapter store is unavailable right now ({type(exc).__name__}); "
        "nothing changed, retry in a few seconds.",
        "type": "service_unavailable",
        "param": None,
        "code": "blob_store_unavailable",
    }


def test_api_errors_keep_their_own_status_body_and_headers() -> None:
    exc = APIError(429, "slow down", code="rate_limited", headers={"Retry-After": "7"})
    status, headers, body = _answer(_raiser(exc))
    assert (status, headers["retry-after"], body) == (429, "7", exc.body()["error"])


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer lpx-abc", "lpx-abc"), ("bearer  lpx-abc ", "lpx-abc"), ("BEARER lpx-abc", "lpx-abc")],
)
def test_bearer_token_reads_the_key(header: str, token: str) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer ", "Bearer   ", "Basic abc", "lpx-abc"])
def test_a_missing_or_malformed_key_is_one_401(header: str) -> None:
    with pytest.raises(APIError) as refused:
        bearer_token(header)
    assert (refused.value.status, refused.value.code) == (401, "invalid_api_key")
    assert refused.value.message == (
        "Missing or malformed API key: send `Authorization: Bearer <key>`."
    )


def test_an_incorrect_key_is_a_401_of_the_same_code() -> None:
    refused = incorrect_api_key()
    assert (refused.status, refused.code) == (401, "invalid_api_key")
    assert refused.message == "Incorrect or revoked API key provided."
