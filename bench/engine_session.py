"""One real vLLM CPU engine behind loraplex, shared by the engine benchmarks.

``loraplex serve`` starts the gateway and one engine (the registry-backed
resolver plugin on, runtime LoRA loading on) on the demo base
(``.loraplex/demo-base``, built with ``loraplex demo-base`` if missing). A
tenant with high limits and a set of stock PEFT adapters, pushed and promoted,
are ready before any benchmark runs. Starting vLLM takes a minute on two cores,
so one session serves the gateway, cold-start and multi-adapter figures.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.procs import free_port, ready, start
from bench.targets import HUGE, REPO, VENV_BIN
from server.dev.process import Process

WORK = Path(__file__).resolve().parent / ".work" / "engine"
DEMO_BASE = REPO / ".loraplex" / "demo-base"
BASE_NAME = "demo-base"
ENGINE_START_TIMEOUT = 600.0


@dataclass(frozen=True)
class SessionConfig:
    """The engine and the adapters prepared for it."""

    adapters: int = 50
    """Adapters built, pushed and promoted (32 for mixes, 18 never requested before the
    cold-start runs: 9 through loraplex, 9 loaded by vLLM directly)."""
    rank: int = 8
    """LoRA rank (q_proj and v_proj)."""
    max_loras: int = 32
    """vLLM ``--max-loras``: adapters one batch may mix (32, so the 32-adapter mix fits)."""
    max_cpu_loras: int = 48
    """vLLM ``--max-cpu-loras``: adapters kept loaded in host memory."""


@dataclass
class Session:
    """A running gateway + engine and what was prepared in its registry."""

    gateway_url: str
    engine_url: str
    engine_key: str
    tenant_key: str
    adapter_names: list[str]
    adapter_dirs: list[Path]
    registry: Any
    tenant_id: int
    proc: Process
    start_seconds: float
    used: set[str] = field(default_factory=set)
    """Adapters already requested (no longer cold)."""

    def auth(self, engine: bool = False) -> dict[str, str]:
        return {"authorization": f"Bearer {self.engine_key if engine else self.tenant_key}"}

    def fresh_adapter(self) -> tuple[str, Path]:
        """An adapter never requested in this session (cold on the engine)."""
        for name, folder in zip(self.adapter_names, self.adapter_dirs, strict=True):
            if name not in self.used:
                self.used.add(name)
                return name, folder
        raise RuntimeError("no cold adapter left; raise SessionConfig.adapters")


def ensure_demo_base() -> Path:
    if not (DEMO_BASE / "config.json").is_file():
        subprocess.run([str(VENV_BIN / "loraplex"), "demo-base"], check=True, cwd=REPO)
    return DEMO_BASE


def build_adapters(base: Path, folder: Path, count: int, rank: int) -> list[Path]:
    """``count`` stock PEFT adapters (seeded, non-zero) on ``base``, built once and cached."""
    folders = [folder / f"adapter-{i:02d}" for i in range(count)]
    if all((f / "adapter_model.safetensors").is_file() for f in folders):
        return folders
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for i, dest in enumerate(folders):
        if (dest / "adapter_model.safetensors").is_file():
            continue
        torch.manual_seed(1000 + i)
        model = AutoModelForCausalLM.from_pretrained(base)
        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
        )
        get_peft_model(model, config).save_pretrained(str(dest), safe_serialization=True)
    return folders


def prepare_registry(
    home: Path, base: Path, adapters: list[Path]
) -> tuple[Any, int, str, list[str]]:
    """Base registered, a tenant with a key, every adapter pushed and promoted."""
    from registry import Actor, Registry, TenantLimits, open_blob_store

    home.mkdir(parents=True, exist_ok=True)
    registry = Registry(f"sqlite:///{home}/registry.db", open_blob_store(str(home / "blobs")))
    actor = Actor("bench", admin=True)
    registry.register_base(base, BASE_NAME, "bench", actor)
    tenant = registry.create_tenant("bench", actor, TenantLimits(HUGE, HUGE, 1_000_000, None))
    assert tenant.id is not None
    _, key = registry.create_api_key(tenant.id, "tenant", actor, name="bench")
    names = []
    for i, folder in enumerate(adapters):
        name = f"bench-{i:02d}"
        version = registry.push_adapter(tenant.id, name, folder, BASE_NAME, actor)
        registry.promote(tenant.id, name, version.number, actor, override=True)
        names.append(name)
    return registry, tenant.id, key, names


@contextlib.contextmanager
def session(config: SessionConfig | None = None) -> Iterator[Session]:
    config = config or SessionConfig()
    base = ensure_demo_base()
    adapters = build_adapters(base, WORK / "adapters", config.adapters, config.rank)
    home = WORK / f"home-{int(time.time())}"
    registry, tenant_id, key, names = prepare_registry(home, base, adapters)
    port, engine_port, engine_key = free_port(), free_port(), secrets.token_hex(16)
    argv = [str(VENV_BIN / "loraplex"), "serve", "--home", str(home), "--port", str(port)]
    argv += ["--base-model", str(base), "--served-model-name", BASE_NAME]
    argv += ["--base-revision", "bench", "--engine-port", str(engine_port)]
    argv += ["--engine-api-key", engine_key, "--max-loras", str(config.max_loras)]
    argv += ["--max-cpu-loras", str(config.max_cpu_loras), "--log-level", "warning"]
    argv += ["--engine-start-timeout", str(int(ENGINE_START_TIMEOUT))]
    proc = start("loraplex+vllm", argv, home / "serve.log", cwd=REPO)
    try:
        took = ready(proc, f"http://127.0.0.1:{port}/readyz", ENGINE_START_TIMEOUT)
        yield Session(
            f"http://127.0.0.1:{port}",
            f"http://127.0.0.1:{engine_port}",
            engine_key,
            key,
            names,
            adapters,
            registry,
            tenant_id,
            proc,
            took,
        )
    finally:
        proc.stop(grace=20)
        registry.close()
        shutil.rmtree(home, ignore_errors=True)  # throwaway state; the adapters stay cached


def first_token(
    client: httpx.Client, url: str, headers: dict[str, str], model: str, max_tokens: int = 4
) -> tuple[float, float, int]:
    """Stream one completion: (seconds to the first content event, total seconds, events)."""
    body = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    started = time.perf_counter()
    first, events = 0.0, 0
    with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as answer:
        if answer.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {answer.status_code}: {answer.read()[:300]!r}")
        for line in answer.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and '"text"' in line:
                events += 1
                first = first or time.perf_counter() - started
    return first, time.perf_counter() - started, events


def engine_metric(client: httpx.Client, session: Session, name: str) -> dict[str, float]:
    """Samples of one Prometheus metric family from the engine's /metrics ({} if absent)."""
    text = client.get(session.engine_url + "/metrics", headers=session.auth(engine=True)).text
    samples = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


if __name__ == "__main__":
    with session() as running:
        print(running.gateway_url, running.engine_url, f"started in {running.start_seconds:.0f}s")
        sys.stdout.flush()
