"""Error mapping shared by every route: a database outage is a retryable 503, not a 500."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import exc as sql

from server.errors import REGISTRY_DOWN, install_api_error_handler


@pytest.mark.parametrize("error", REGISTRY_DOWN)
def test_database_outage_is_a_retryable_503_in_openai_shape(error: type[Exception]) -> None:
    app = FastAPI()
    install_api_error_handler(app)

    @app.get("/thing")
    async def thing() -> None:
        if error is sql.TimeoutError:
            raise sql.TimeoutError("QueuePool limit reached")
        raise error("SELECT 1", {}, OSError("connection refused"))

    answer = TestClient(app, raise_server_exceptions=False).get("/thing")
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "2"
    body = answer.json()["error"]
    assert body["code"] == "registry_unavailable" and body["type"] == "service_unavailable"
    assert "connection refused" not in answer.text  # driver details stay in the log
