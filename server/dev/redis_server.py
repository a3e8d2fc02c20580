"""A throwaway ``redis-server`` on a free loopback port, for the chaos soak and the fleet.

Tests that share the machine's Redis (127.0.0.1:6379) must never see it
killed; this one belongs to whoever started it. Nothing is persisted (no RDB
snapshot, no append-only file): what the gateways keep in it (tenant limits)
is meant to be lost when it dies. Like every ``LocalServer``, a killed one comes
back at the same URL.
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass

from server.dev.local_server import LocalServer


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("redis-server not found on PATH (Debian: apt-get install redis-server)")
    return found


def _answers_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
        conn.sendall(b"PING\r\n")
        return conn.recv(16).startswith(b"+PONG")


@dataclass
class RedisServer(LocalServer):
    """One ``redis-server`` of our own; ``start`` again after ``kill`` or ``stop``."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> RedisServer:
        """Start it and wait until it answers PING."""
        command = [
            redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ]
        self.launch(command, lambda: _answers_ping(self.port), timeout, interval=0.1)
        return self

    def stop(self) -> None:
        """SIGTERM, as an orchestrator stops it (SIGKILL after a few seconds)."""
        if self.runner is not None:
            self.runner.stop(grace=5)
