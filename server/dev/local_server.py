"""What the throwaway servers of the chaos soak share: a port kept for life, a runner, a log.

``server.dev.postgres`` and ``server.dev.redis_server`` build on it. The port
is chosen once, so a server that is killed comes back at the same address,
as a Kubernetes Service would bring it back.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from server.dev.process import Process, ProcessFailed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalServer:
    """A server of our own on loopback, run by a :class:`Process` logging under ``workdir``."""

    name: ClassVar[str]
    """The program, as logs and messages name it."""
    workdir: Path
    port: int = field(default_factory=free_port)
    runner: Process | None = field(default=None, init=False, repr=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def alive(self) -> bool:
        return self.runner is not None and self.runner.alive

    def kill(self) -> None:
        """SIGKILL: a crashed node."""
        if self.runner is not None:
            self.runner.kill()

    def launch(
        self, command: list[str], ready: Callable[[], bool], timeout: float, interval: float
    ) -> None:
        """Start ``command`` and wait until ``ready()``; killed again if it never is."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.runner = Process(self.name, command, self.log_path, dies_with_parent=True)
        self.runner.start()
        try:
            self.runner.wait_ready(ready, timeout=timeout, interval=interval)
        except ProcessFailed:
            self.kill()
            raise
