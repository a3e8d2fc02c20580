"""The demo's own processes and registry, shared by ``server.dev.demo`` and
``server.dev.demo_loop``: ``loraplex serve`` and ``loraplex worker`` started as users run
them, waiting for the engine, and operator access to the registry under the demo's home.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from registry import TENANT_SCOPE, Actor, LocalBlobStore, NotFound, Registry
from server.dev.fleet import free_port
from server.dev.process import Process, ProcessFailed

HOME = Path(os.environ.get("LORAPLEX_HOME", ".loraplex"))
OPERATOR = Actor("demo:operator", admin=True)


def say(line: str) -> None:
    print(f"\033[1m==> {line}\033[0m", flush=True)


def start_server(base: Path, port: int, log_path: Path) -> Process:
    loraplex = Path(sys.executable).with_name("loraplex")
    cmd = [
        str(loraplex),
        "serve",
        "--home",
        str(HOME),
        "--base-model",
        str(base),
        "--port",
        str(port),
        "--engine-port",
        str(free_port()),
        "--engine-dtype",
        "float32",
        "--engine-memory-fraction",
        "0.1",
    ]
    return _demo_process("loraplex serve", cmd, log_path)


def _demo_process(name: str, command: list[str], log_path: Path) -> Process:
    # In its own process group a child no longer hears the terminal's Ctrl-C; it must
    # still not outlive a demo that is killed outright.
    return Process(name, command, log_path, dies_with_parent=True, grace=60).start()


def wait_ready(url: str, server: Process) -> None:
    started = time.monotonic()

    def answering() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return True
        elapsed = time.monotonic() - started
        print(f"\r    waiting for the vLLM engine to load the model... {elapsed:.0f} s", end="")
        return False

    try:
        took = server.wait_ready(answering, timeout=900, interval=1)
    except ProcessFailed as exc:
        raise SystemExit(f"the server did not start: {exc}") from None
    print(f"    ready after {took:.0f} s", flush=True)


def demo_registry() -> Registry:
    """The registry `loraplex serve` uses under the demo's home, opened as an operator would."""
    return Registry(f"sqlite:///{(HOME / 'registry.db').resolve()}", LocalBlobStore(HOME / "blobs"))


def tenant_key(registry: Registry, name: str) -> str:
    """A fresh key for tenant ``name``, creating the tenant on the first run."""
    try:
        tenant = registry.get_tenant(name)
    except NotFound:
        tenant = registry.create_tenant(name, OPERATOR)
    assert tenant.id is not None
    _, key = registry.create_api_key(tenant.id, TENANT_SCOPE, OPERATOR)
    return key


def start_worker(base: Path, log_path: Path) -> Process:
    loraplex = Path(sys.executable).with_name("loraplex")
    cmd = [str(loraplex), "worker", "--home", str(HOME), "--base-model", str(base)]
    return _demo_process("loraplex worker", cmd, log_path)


def run_alone(turn: Callable[[str, str], object]) -> int:
    """One demo turn on a server and a worker of its own (the demo base built if needed):
    ``turn(url, base name)``; -> the exit status."""
    from training.demo_base import build_demo_base

    base = build_demo_base(HOME / "demo-base")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    say(f"starting `loraplex serve` on {url} and `loraplex worker` (logs: {HOME / 'logs'})")
    server = start_server(base, port, HOME / "logs" / "demo-serve.log")
    try:
        wait_ready(url, server)
        worker = start_worker(base, HOME / "logs" / "demo-worker.log")
        try:
            turn(url, base.name)
        finally:
            worker.stop()
    finally:
        say("stopping the server, its engine and the worker")
        server.stop()
    return 0
