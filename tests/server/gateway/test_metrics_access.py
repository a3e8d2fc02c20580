"""Who may read /metrics: its labels name every tenant and adapter."""

from __future__ import annotations

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from server.config import Settings
from server.gateway.app import GatewayApp
from server.gateway.ops_routes import metrics_allowed
from server.gateway.transport import server_config


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


async def test_behind_a_local_proxy_the_forwarded_client_decides() -> None:
    """A reverse proxy on the same host must not make every client look like loopback."""
    app = GatewayApp()

    async def who(request: Request) -> dict[str, str]:
        return {"host": request.client.host if request.client else ""}

    async def hot(scope: Scope, receive: Receive, send: Send) -> None:
        await JSONResponse({"host": scope["client"][0]})(scope, receive, send)

    app.add_api_route("/who", who, methods=["GET", "POST"])
    app.hot_routes["/hot"] = hot
    config = server_config(app, Settings())
    assert not config.proxy_headers  # the app applies them itself, to its framework routes
    transport = httpx.ASGITransport(app, client=("127.0.0.1", 40000))
    forwarded = {"x-forwarded-for": "203.0.113.5"}
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        assert (await client.get("/who", headers=forwarded)).json() == {"host": "203.0.113.5"}
        assert (await client.get("/who")).json() == {"host": "127.0.0.1"}
        # Inference routes never read the client address: no header scan for them.
        assert (await client.post("/hot", headers=forwarded)).json() == {"host": "127.0.0.1"}
