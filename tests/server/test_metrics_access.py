"""Who may read /metrics: its labels name every tenant and adapter."""

from __future__ import annotations

from starlette.requests import Request

from server.app import metrics_allowed


def request(host: str, authorization: str = "") -> Request:
    headers = [(b"authorization", authorization.encode())] if authorization else []
    scope = {"type": "http", "headers": headers, "client": (host, 40000)}
    return Request(scope)


def test_without_a_token_only_loopback_clients_may_read() -> None:
    assert metrics_allowed(request("127.0.0.1"), "")
    assert metrics_allowed(request("::1"), "")
    assert not metrics_allowed(request("10.0.0.7"), "")


def test_with_a_token_everyone_needs_it_loopback_included() -> None:
    assert metrics_allowed(request("10.0.0.7", "Bearer s3cret"), "s3cret")
    assert not metrics_allowed(request("10.0.0.7", "Bearer wrong"), "s3cret")
    assert not metrics_allowed(request("127.0.0.1"), "s3cret")
