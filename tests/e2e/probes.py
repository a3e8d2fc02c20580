"""Shared parts of the fuzzing, isolation, secrets and limits suites.

OpenAI-shaped error checks, probe tallies, and extra gateways on the session engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from registry import LocalBlobStore, Registry
from tests.e2e.serving import ServeProcess
from tests.registry.registry_testdata import create_database, drop_database

ERROR_FIELDS = {"message", "type", "param", "code"}
VAGUE_MESSAGES = {"invalid request", "not found", "internal server error", "bad request"}


class JSONResponse(Protocol):
    """What both httpx and requests responses offer."""

    status_code: int

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


def error_shape_problem(response: JSONResponse) -> str:
    """Why an error response is not a precise OpenAI-shaped error ('' if it is)."""
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.text[:200]!r}"
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return f"not {{'error': {{...}}}}: {body!r:.200}"
    error = body["error"]
    if set(error) != ERROR_FIELDS:
        return f"error fields {sorted(error)} != {sorted(ERROR_FIELDS)}"
    message = error["message"]
    if not isinstance(message, str) or message.strip().lower().rstrip(".") in VAGUE_MESSAGES:
        return f"vague message {message!r}"
    if not isinstance(error["type"], str) or not error["type"]:
        return f"bad type {error['type']!r}"
    for name in ("param", "code"):
        if error[name] is not None and not isinstance(error[name], str):
            return f"{name} is {error[name]!r}, not a string or null"
    return ""


@dataclass
class Probes:
    """A tally of probes: each one either holds or is written down as a leak."""

    tried: int = 0
    leaks: list[str] = field(default_factory=list)

    def check(self, holds: bool, what: str) -> None:
        self.tried += 1
        if not holds:
            self.leaks.append(what)

    def error(self, response: JSONResponse, status: int, what: str) -> None:
        """One probe: ``response`` is a precise OpenAI-shaped error with ``status``."""
        problem = error_shape_problem(response)
        if response.status_code != status:
            problem = f"status {response.status_code} != {status}: {response.text[:200]}"
        self.check(not problem, f"{what}: {problem}")


def gateway_on_engine(
    home: Path, engine_port: int, engine_key: str, args: list[str], env: dict[str, str]
) -> ServeProcess:
    """A started (not yet ready) ``loraplex serve`` in front of the session's running engine."""
    return ServeProcess(
        home,
        args=["--engine-urls", f"http://127.0.0.1:{engine_port}", *args],
        env={"LORAPLEX_ENGINE_API_KEY": engine_key, **env},
    ).start()


@contextlib.contextmanager
def postgres_gateway(
    database: str, home: Path, engine_port: int, engine_key: str, demo_base: Path
) -> Iterator[tuple[ServeProcess, Registry]]:
    """A ready gateway on a new PostgreSQL database of its own, in front of the session's
    engine, with a registry on that database; both gone (and the database dropped) after."""
    url = create_database(database)
    serve = gateway_on_engine(
        home, engine_port, engine_key, ["--base-model", str(demo_base)],
        {"LORAPLEX_DATABASE_URL": url},
    )  # fmt: skip
    own = None
    try:
        serve.wait_ready(timeout=120)
        own = Registry(url, LocalBlobStore(home / "blobs"))
        yield serve, own
    finally:
        if own is not None:
            own.close()
        stopped = serve.stop()
        drop_database(url)
        assert stopped, serve.log_tail()
