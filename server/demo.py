"""``make demo``: the whole product on one laptop, with the official ``openai`` client.

Builds the demo base (once), starts ``loraplex serve`` as users run it, sends
a few requests through the gateway and prints what came back, then stops the
server and its engine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI

HOME = Path(os.environ.get("LORAPLEX_HOME", ".loraplex"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(line: str) -> None:
    print(f"\033[1m==> {line}\033[0m", flush=True)


def start_server(base: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
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
        str(_free_port()),
        "--engine-dtype",
        "float32",
        "--engine-memory-fraction",
        "0.1",
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, server: subprocess.Popen[bytes], log_path: Path) -> None:
    started = time.monotonic()
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the server exited; see {log_path}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                print(f"    ready after {time.monotonic() - started:.0f} s", flush=True)
                return
        except httpx.HTTPError:
            pass
        elapsed = time.monotonic() - started
        if elapsed > 900:
            raise SystemExit(f"the engine did not start in 15 minutes; see {log_path}")
        print(f"\r    waiting for the vLLM engine to load the model... {elapsed:.0f} s", end="")
        time.sleep(1)


def show_requests(client: OpenAI, model: str) -> None:
    _say(f"GET /v1/models -> {[m.id for m in client.models.list()]}")

    prompt = "The cat sat on the"
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0)
    _say(f"completion of {prompt!r}:")
    print(f"    {prompt}{reply.choices[0].text}")

    question = "What color is the sky?"
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=30, temperature=0
    )
    _say(f"chat: {question!r}")
    print(f"    {chat.choices[0].message.content}")

    _say("streamed chat: 'Tell me a story.'")
    print("    ", end="")
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


def main() -> int:
    from training.demo_base import build_demo_base

    _say("building the demo base model (cached after the first run)")
    base = build_demo_base(HOME / "demo-base")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = HOME / "logs" / "demo-serve.log"
    _say(f"starting `loraplex serve` on {url} (log: {log_path})")
    server = start_server(base, port, log_path)
    try:
        wait_ready(url, server, log_path)
        client = OpenAI(base_url=url + "/v1", api_key="demo", max_retries=0)
        show_requests(client, base.name)
    finally:
        _say("stopping the server and its engine")
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    _say("demo finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
