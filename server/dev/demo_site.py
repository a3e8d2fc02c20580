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


def random_adapter(base: Path, dest: Path, seed: int) -> Path:
    """Stock PEFT output with seeded, non-zero LoRA weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(str(dest))
    return dest


def upload_and_promote(url: str, key: str, name: str, adapter: Path, base: str) -> int:
    auth = {"authorization": f"Bearer {key}"}
    files = [
        ("files", (f.name, f.read_bytes()))
        for f in sorted(adapter.iterdir())
        if f.suffix in (".json", ".safetensors")
    ]
    pushed = httpx.post(
        f"{url}/v1/adapters",
        files=files,
        data={"name": name, "base": base},
        headers=auth,
        timeout=300,
    )
    pushed.raise_for_status()
    number = int(pushed.json()["version"])
    httpx.post(
        f"{url}/v1/adapters/{name}/promote", json={"version": number}, headers=auth, timeout=300
    ).raise_for_status()
    return number
