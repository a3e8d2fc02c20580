"""The one exception the client raises: the server's OpenAI-shaped error, or why none came."""

from __future__ import annotations

from typing import Any

import httpx


class LoraplexError(Exception):
    """A request the gateway refused, or one that never got an answer.

    An HTTP error carries the body ``{"error": {"message", "type", "param", "code"}}`` the
    gateway sends; a transport failure (refused connection, timeout) has ``status`` None and
    ``code`` ``"connection_error"``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        """The server's message (it says what went wrong and, mostly, what to do)."""
        self.status = status
        """The HTTP status; None when no answer came."""
        self.code = code
        """The machine-readable code (``"invalid_api_key"``, ``"rate_limit_exceeded"``...)."""
        self.param = param
        """The request field the error is about, if one is."""
        self.type = type
        """OpenAI's error type (``"authentication_error"``...)."""
        self.retry_after = retry_after
        """Seconds the server asked to wait before retrying (``Retry-After``), if it did."""

    @property
    def retryable(self) -> bool:
        """Whether retrying later can succeed: the server said when (429/503 ``Retry-After``)."""
        return self.status in (429, 503) and self.retry_after is not None

    def __str__(self) -> str:
        if self.status is None:  # the message says why no answer came
            return self.message
        code = f" {self.code}" if self.code else ""
        return f"{self.message} (HTTP {self.status}{code})"

    @classmethod
    def from_response(cls, response: httpx.Response) -> LoraplexError:
        """The error a non-2xx answer carries (a body that is not OpenAI-shaped: its text)."""
        error: dict[str, Any] = {}
        try:
            body = response.json()
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                error = body["error"]
            elif isinstance(body, dict) and "detail" in body:  # FastAPI's own validation errors
                error = {"message": _detail_message(body["detail"]), "code": "invalid_request"}
        except ValueError:
            pass
        message = str(error.get("message") or response.text.strip() or response.reason_phrase)
        return cls(
            message,
            status=response.status_code,
            code=error.get("code"),
            param=error.get("param"),
            type=error.get("type"),
            retry_after=retry_after(response),
        )


def _detail_message(detail: Any) -> str:
    if not isinstance(detail, list):
        return str(detail)
    parts = []
    for item in detail:
        where = ".".join(str(p) for p in item.get("loc", []) if p != "body")
        parts.append(f"{where}: {item.get('msg', '')}" if where else str(item.get("msg", "")))
    return "; ".join(parts)


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (the delta-seconds form the gateway sends), or None."""
    value = response.headers.get("retry-after", "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:  # an HTTP date: the gateway never sends one; back off by default
        return None
