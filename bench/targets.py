"""The gateways under test, each started in front of an upstream URL.

(a) the upstream itself, (b) loraplex (authentication, routing, limits, metrics
and usage accounting all on, as in production), (b') the same with its tenant
limits in Redis, as a fleet of gateways runs it, (c) the LiteLLM proxy with one
worker, (d) vllm-router (Rust). Every target proxies the same upstream.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from bench import peers
from bench.procs import free_port, ready, start
from server.dev.process import Process

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MODEL = "stub-model"
START_TIMEOUT = 180.0
HUGE = 10**12
"""Tenant limits high enough never to refuse, so the limiter runs but never answers 429."""
BENCH_REDIS_URL = "redis://127.0.0.1:6379/15"
"""The machine's Redis; a database of the benchmark's own (its tenants' keys expire)."""


@dataclass
class Running:
    """A started target: where to send requests, with which key, and its process."""

    name: str
    url: str
    api_key: str = ""
    proc: Process | None = None
    """None when the target is the upstream itself (its CPU is the stub's)."""
    version: str = ""
    start_seconds: float = 0.0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def start_stub(work: Path, stream_chunks: int = 8, chunk_interval_ms: float = 0.0) -> Running:
    port = free_port()
    argv = [sys.executable, "-m", "bench.stub_upstream", "--port", str(port)]
    argv += ["--stream-chunks", str(stream_chunks), "--chunk-interval-ms", str(chunk_interval_ms)]
    proc = start("stub", argv, work / "logs" / "stub.log", cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    took = ready(proc, url + "/health", 30)
    return Running("stub", url, proc=proc, version="bench/stub_upstream.py", start_seconds=took)


def loraplex_home(work: Path, model: str) -> tuple[Path, Path, str]:
    """A registry home with a tiny base dir and one tenant key; (home, base dir, key)."""
    from registry import Actor, Registry, TenantLimits, open_blob_store
    from training.demo_base import DemoBaseConfig, build_demo_base

    home = work / "loraplex-home"
    base = work / "tiny-base"
    if not (base / "config.json").is_file():
        build_demo_base(base, DemoBaseConfig.tiny())
    home.mkdir(parents=True, exist_ok=True)
    registry = Registry(f"sqlite:///{home}/registry.db", open_blob_store(str(home / "blobs")))
    actor = Actor("bench", admin=True)
    limits = TenantLimits(HUGE, HUGE, 1_000_000, None)
    tenant = registry.create_tenant(f"bench-{free_port()}", actor, limits)
    _, key = registry.create_api_key(tenant.id, "tenant", actor, name="bench")
    return home, base, key


def start_loraplex(work: Path, upstream: str, model: str = MODEL, redis_url: str = "") -> Running:
    """loraplex; with ``redis_url``, counting its tenant limits there (``loraplex-redis``)."""
    name = "loraplex-redis" if redis_url else "loraplex"
    home, base, key = loraplex_home(work, model)
    port = free_port()
    argv = [str(VENV_BIN / "loraplex"), "serve", "--home", str(home), "--port", str(port)]
    argv += ["--engine-urls", upstream, "--served-model-name", model]
    argv += ["--base-model", str(base), "--base-revision", "bench", "--log-level", "warning"]
    env = {"LORAPLEX_REDIS_URL": redis_url} if redis_url else None
    proc = start(name, argv, work / "logs" / f"{name}.log", env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    took = ready(proc, url + "/readyz", START_TIMEOUT)
    return Running(name, url, key, proc, version="working tree", start_seconds=took)


def start_loraplex_redis(work: Path, upstream: str) -> Running:
    return start_loraplex(work, upstream, redis_url=BENCH_REDIS_URL)


def start_litellm(work: Path, upstream: str, model: str = MODEL) -> Running:
    binary = peers.ensure(peers.LITELLM)
    config = work / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: none\n"
    )
    port = free_port()
    argv = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", "1"]
    env = {"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
    proc = start("litellm", argv, work / "logs" / "litellm.log", env=env)
    url = f"http://127.0.0.1:{port}"
    took = ready(proc, url + "/health/liveliness", START_TIMEOUT)
    return Running("litellm", url, proc=proc, version=peers.LITELLM.version, start_seconds=took)


def start_vllm_router(work: Path, upstream: str) -> Running:
    binary = peers.ensure(peers.VLLM_ROUTER)
    port = free_port()
    argv = [str(binary), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", upstream]
    argv += ["--log-level", "warning"]
    proc = start("vllm-router", argv, work / "logs" / "vllm-router.log")
    url = f"http://127.0.0.1:{port}"
    took = ready(proc, url + "/health", START_TIMEOUT)
    version = peers.VLLM_ROUTER.version
    return Running("vllm-router", url, proc=proc, version=version, start_seconds=took)
