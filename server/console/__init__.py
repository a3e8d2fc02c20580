"""The lifecycle console: static pages the gateway serves at ``/console/``.

The console is plain HTML, CSS and one JavaScript module under ``static/``, shipped
with the package (no CDN, no build step). It holds no privileges of its own: the
browser signs in with a tenant or admin key and calls the same REST routes as any
client, so every change it makes is audited as that key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).parent / "static"
PREFIX = "/console"

SECURITY_HEADERS = {
    # Only the console's own files may run or style the page; inline script is refused,
    # so a tenant-supplied string that slipped into markup could still not execute.
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


class ConsoleFiles(StaticFiles):
    """``static/`` with the security headers on every answer; the HTML is never cached
    (a stale page would load a newer script), the assets revalidate by ETag."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        html = path in ("", ".", "index.html")
        response.headers["cache-control"] = "no-store" if html else "no-cache"
        return response


def add(app: FastAPI) -> None:
    """Serve the console at ``/console/`` (``/console`` redirects there, so the page's
    relative asset paths resolve under the prefix)."""

    @app.get(PREFIX, include_in_schema=False)
    def console_root() -> Response:
        return RedirectResponse(f"{PREFIX}/", status_code=308)

    app.mount(PREFIX, ConsoleFiles(directory=STATIC, html=True), name="console")
