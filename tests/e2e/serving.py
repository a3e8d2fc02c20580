"""Starting `loraplex serve` as a real subprocess, as users run it, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from prometheus_client import Metric

from server.dev.fleet import free_port as free_port  # re-exported for the e2e tests
from server.dev.process import Process

REPO = Path(__file__).resolve().parents[2]
LOADER = Path(sys.executable).parent / "loraplex"
ENGINE_MODULE = "vllm.entrypoints.openai.api_server"


@dataclass
class ServeProcess:
    """One `loraplex serve` process (gateway, plus an engine unless engine URLs are given)."""

    home: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    runner: Process | None = field(default=None, init=False, repr=False)

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The serve process itself (None before ``start``), for tests that watch or signal it."""
        return self.runner.popen if self.runner else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / "serve.log"

    def start(self) -> ServeProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "LORAPLEX_LOG_LEVEL": "info", **self.env}
        cmd = [str(LOADER), "serve", "--home", str(self.home), "--port", str(self.port), *self.args]
        self.runner = Process("loraplex serve", cmd, self.log_path, env).start()
        return self

    def wait_ready(self, timeout: float = 600, engines: int = 1) -> None:
        """Wait until ``/readyz`` reports at least ``engines`` healthy engines."""
        self._runner().wait_ready(lambda: self._ready(engines), timeout=timeout)

    def _ready(self, engines: int) -> bool:
        ready = httpx.get(self.url + "/readyz", timeout=2)
        return ready.status_code == 200 and ready.json()["engines_healthy"] >= engines

    def engine_processes(self) -> list[psutil.Process]:
        """The engine API servers this serve process started (direct children running vLLM)."""
        found = []
        for child in psutil.Process(self._runner().pid).children(recursive=True):
            try:
                if ENGINE_MODULE in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.NoSuchProcess:
                continue
        return found

    def all_descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self._runner().pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 60) -> bool:
        """SIGTERM, as an orchestrator would; True if it shut down cleanly in time.

        Like uvicorn, serve re-raises the signal after its graceful shutdown, so a
        clean exit is status 0 or death by that same SIGTERM. The signal goes to
        serve alone: stopping its engines is its own job, which the tests check.
        """
        code = self._runner().stop(timeout, leader_only=True)
        return code in (0, -signal.SIGTERM)

    def log_tail(self, lines: int = 40) -> str:
        return self._runner().tail(lines) if self.runner else "(no log)"

    def _runner(self) -> Process:
        assert self.runner is not None, "loraplex serve was never started"
        return self.runner


def wait_gone(processes: list[psutil.Process], timeout: float = 30) -> list[psutil.Process]:
    """Processes still alive (zombies count as gone) after ``timeout`` seconds."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def metric_families(url: str, headers: dict[str, str] | None = None) -> list[Metric]:
    """The metric families a live /metrics endpoint exposes (declared ones included)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers=headers or {}, timeout=10).text
    return list(text_string_to_metric_families(text))


def metric_samples(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) for every sample called ``name`` on a live /metrics endpoint."""
    return [
        (dict(sample.labels), sample.value)
        for family in metric_families(url)
        for sample in family.samples
        if sample.name == name
    ]


def shared_registry_env(serve: ServeProcess) -> dict[str, str]:
    """Settings that make another gateway use ``serve``'s registry and blob store."""
    return {
        "LORAPLEX_DATABASE_URL": f"sqlite:///{serve.home / 'registry.db'}",
        "LORAPLEX_BLOB_URL": str(serve.home / "blobs"),
    }
