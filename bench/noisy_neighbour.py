"""A noisy tenant cannot take everyone's p99 (issue 16, item 4): a quiet tenant's time to
first token alone, then beside a tenant flooding 1,500-token prompts, with the gateway's
fair queueing off and on, on the real vLLM CPU engine.

One engine (``loraplex serve`` starts it with loraplex's defaults: the 2,048-token
context, priority scheduling, 512-token steps, long prompts prefilled 128 tokens a step)
and three gateways in front of it, on one registry: fair queueing with its defaults (the
engine's ``serve``), fair queueing off, and fair queueing with a tenant in-flight budget
of one flood request. Then, for comparison, an engine on vLLM's own scheduling (first
come first served, 2,048-token steps, no prefill chunk cap) behind fair queueing as it
was before the engine's scheduling was used (no prompt bound), and fair queueing off: no
gateway can interrupt a step the engine has begun, nor reorder what already waits in it.

The quiet tenant streams one short completion at a time (4 tokens, ``first_token``), a
pause between; the flood tenant keeps ``clients`` non-streamed requests in flight, each
a fresh 1,500-token prompt (a new random prefix: vLLM's prefix cache never helps it) and
16 completion tokens, retrying after a 429/503 as ``Retry-After`` says. Between phases
the engine drains (its running and waiting queues at 0). Target: the quiet tenant's p99
beside the flood, fairness on, at most 1.5 x its p99 alone.

Run: ``.venv/bin/python -m bench.noisy_neighbour [--quick]`` (under the engine lock on
shared machines); writes ``bench/results/noisy_neighbour.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.engine_session import BASE_NAME, WORK, ensure_demo_base, first_token, prepare_registry
from bench.gateway import machine
from bench.procs import free_port, ready, start
from bench.results import publish
from bench.stats import ratio, summarize_ms
from bench.targets import HUGE, REPO, VENV_BIN
from server.config import Settings
from server.dev.process import Process
from server.gateway.accounting import estimate_tokens
from server.gateway.fair_queue import FairGate
from server.gateway.metrics import Metrics

COMMAND = ".venv/bin/python -m bench.noisy_neighbour"
TARGET_RATIO = 1.5
PROMPT_TOKENS = 1500
FLOOD_MAX_TOKENS = 16
START_TIMEOUT = 600.0
WORDS = [
    "river",
    "stone",
    "lantern",
    "copper",
    "meadow",
    "violet",
    "harbor",
    "thunder",
    "maple",
    "silver",
    "orbit",
    "candle",
    "glacier",
    "pepper",
    "falcon",
    "marble",
    "saddle",
    "quartz",
    "willow",
    "ember",
    "tundra",
    "cobalt",
    "jasmine",
    "anchor",
]


@dataclass(frozen=True)
class NoisyConfig:
    """How hard the flood pushes, and how long the quiet tenant is measured."""

    clients: int = 48  # flood requests kept in flight (closed loop)
    samples: int = 60  # quiet requests per phase
    pause_s: float = 0.2  # between two quiet requests: a quiet tenant, not a second flood
    warmup_s: float = 8.0  # flood time before the quiet tenant's first request of a phase

    def quick(self) -> NoisyConfig:
        return NoisyConfig(clients=8, samples=12, pause_s=0.1, warmup_s=3.0)


@dataclass
class Gateways:
    """The gateways on the one engine, by name, and how to reach the engine itself."""

    urls: dict[str, str]
    engine_url: str
    engine_key: str
    quiet_key: str
    flood_key: str
    words: int
    """Words of a flood prompt (``PROMPT_TOKENS`` tokens)."""
    tight_budget: int
    """The ``fair_tight`` gateway's tenant in-flight budget: one flood request."""
    procs: list[Process] = field(default_factory=list)


def flood_body(words: int, rng: random.Random) -> dict[str, Any]:
    """A fresh prompt of about ``PROMPT_TOKENS`` tokens: a random prefix defeats prefix caching."""
    text = f"{rng.getrandbits(64):x} " + " ".join(rng.choice(WORDS) for _ in range(words))
    return {"model": BASE_NAME, "prompt": text, "max_tokens": FLOOD_MAX_TOKENS}


def words_for(base: Path) -> int:
    """Words a flood prompt needs to be ``PROMPT_TOKENS`` tokens long, by the base's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    sample = flood_body(400, random.Random(0))["prompt"]
    per_word = len(tokenizer(sample)["input_ids"]) / 401
    return int(PROMPT_TOKENS / per_word)


class Flood:
    """``clients`` closed-loop flood requests, on their own event loop in a thread."""

    def __init__(self, url: str, key: str, clients: int, words: int) -> None:
        self.url, self.key, self.clients, self.words = url, key, clients, words
        self.counts: dict[str, int] = {"ok": 0, "429": 0, "503": 0, "other": 0}
        self.prompt_tokens: list[int] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.started = 0.0

    def start(self) -> Flood:
        self._thread.start()
        self.started = time.monotonic()
        for _ in range(self.clients):
            client = self._client(random.Random(secrets.randbits(32)))
            asyncio.run_coroutine_threadsafe(client, self._loop)
        return self

    def stop(self) -> float:
        """Cancel every flood request (their connections close: waiting ones are dropped);
        the seconds it ran."""
        seconds = time.monotonic() - self.started
        asyncio.run_coroutine_threadsafe(_cancel_others(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        return seconds

    async def _client(self, rng: random.Random) -> None:
        headers = {"authorization": f"Bearer {self.key}"}
        async with httpx.AsyncClient(timeout=300) as client:
            while True:
                answer = await client.post(
                    self.url + "/v1/completions", json=flood_body(self.words, rng), headers=headers
                )
                kind = {200: "ok", 429: "429", 503: "503"}.get(answer.status_code, "other")
                self.counts[kind] += 1
                if answer.status_code == 200:
                    self.prompt_tokens.append(answer.json()["usage"]["prompt_tokens"])
                elif "retry-after" in answer.headers:
                    await asyncio.sleep(float(answer.headers["retry-after"]))


async def _cancel_others() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def engine_idle(gateways: Gateways, timeout: float = 120.0) -> None:
    """Wait until the engine runs and queues nothing (the last phase's requests are gone)."""
    deadline = time.monotonic() + timeout
    auth = {"authorization": f"Bearer {gateways.engine_key}"}
    while time.monotonic() < deadline:
        text = httpx.get(gateways.engine_url + "/metrics", headers=auth, timeout=10).text
        busy = [
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting"))
        ]
        if not any(busy):
            return
        time.sleep(0.5)
    raise RuntimeError("the engine never drained between phases")


def phase(gateways: Gateways, gateway: str, config: NoisyConfig, flooded: bool) -> dict[str, Any]:
    """The quiet tenant's TTFTs through ``gateway``, beside the flood if ``flooded``."""
    engine_idle(gateways)
    url = gateways.urls[gateway]
    flood = None
    if flooded:
        flood = Flood(url, gateways.flood_key, config.clients, gateways.words).start()
        time.sleep(config.warmup_s)
    ttfts = []
    with httpx.Client(timeout=300) as client:
        auth = {"authorization": f"Bearer {gateways.quiet_key}"}
        for _ in range(config.samples):
            ttfts.append(first_token(client, url, auth, BASE_NAME)[0])
            time.sleep(config.pause_s)
    out: dict[str, Any] = {"gateway": gateway, "quiet_ttft": summarize_ms(ttfts)}
    if flood is not None:
        seconds = flood.stop()
        tokens = flood.prompt_tokens
        out["flood"] = {
            **flood.counts,
            "served_per_s": flood.counts["ok"] / seconds,
            "mean_prompt_tokens": sum(tokens) / len(tokens) if tokens else None,
        }
    print(f"[noisy] {gateway}{' + flood' if flood else ''}: {out}", flush=True)
    return out


def gateway_variants(tight_budget: int, fair_args: list[str]) -> dict[str, list[str]]:
    """The gateways on one engine and their settings; the first starts the engine."""
    return {
        "fair": fair_args,
        "fifo": ["--fair-queueing", "false"],
        "fair_tight": [*fair_args, "--tenant-max-in-flight-tokens", str(tight_budget)],
    }


@contextlib.contextmanager
def running(
    work: Path, engine_args: str, variants: Callable[[int], dict[str, list[str]]]
) -> Iterator[Gateways]:
    """One engine (``engine_args`` added to its command line) and its gateways (``variants``
    of the one-request budget) on one registry; everything stopped after."""
    from registry import Actor, TenantLimits

    base = ensure_demo_base()
    home = work / f"home-{int(time.time())}"
    registry, _, quiet_key, _ = prepare_registry(home, base, [])
    actor = Actor("bench", admin=True)
    flood = registry.create_tenant("flood", actor, TenantLimits(HUGE, HUGE, 1_000_000, None))
    assert flood.id is not None
    _, flood_key = registry.create_api_key(flood.id, "tenant", actor, name="flood")
    registry.close()
    words = words_for(base)
    tight = estimate_tokens(flood_body(words, random.Random(1)), FLOOD_MAX_TOKENS) + 100
    engine_port, engine_key = free_port(), secrets.token_hex(16)
    engine_url = f"http://127.0.0.1:{engine_port}"
    gateways = Gateways({}, engine_url, engine_key, quiet_key, flood_key, words, tight)
    env = {
        "LORAPLEX_DATABASE_URL": f"sqlite:///{home}/registry.db",
        "LORAPLEX_BLOB_URL": str(home / "blobs"),
        "LORAPLEX_ENGINE_API_KEY": engine_key,
    }
    engine = ["--base-model", str(base), "--base-revision", "bench"]
    engine += ["--engine-port", str(engine_port), "--engine-extra-args", engine_args]
    external = ["--engine-urls", engine_url]
    try:
        for i, (name, args) in enumerate(variants(tight).items()):
            where = engine if i == 0 else external
            gateways.urls[name] = _gateway(gateways, name, home, [*where, *args], env)
        yield gateways
    finally:
        for proc in reversed(gateways.procs):
            proc.stop(grace=20)


def _gateway(
    gateways: Gateways, name: str, home: Path, args: list[str], env: dict[str, str]
) -> str:
    port = free_port()
    folder = home / name
    folder.mkdir(parents=True, exist_ok=True)
    argv = [str(VENV_BIN / "loraplex"), "serve", "--home", str(folder), "--port", str(port)]
    argv += ["--served-model-name", BASE_NAME, "--log-level", "warning", *args]
    argv += ["--engine-start-timeout", str(int(START_TIMEOUT))]
    proc = start(f"loraplex-{name}", argv, folder / "serve.log", env=env, cwd=REPO)
    gateways.procs.append(proc)
    url = f"http://127.0.0.1:{port}"
    ready(proc, url + "/readyz", START_TIMEOUT)
    return url


PHASES = {
    "alone": ("fair", False),
    "flood_fairness_off": ("fifo", True),
    "flood_fairness_on": ("fair", True),
    "flood_fairness_on_tight_budget": ("fair_tight", True),
    "alone_after": ("fair", False),
}
"""Each phase's gateway, and whether the flood runs beside the quiet tenant."""


@dataclass(frozen=True)
class EngineSession:
    """One engine, the settings of its fair-queueing gateways, and the phases measured."""

    engine_args: str
    """Added to the engine's command line after loraplex's own flags (the last one wins)."""
    fair_args: list[str]
    """Settings of the ``fair`` and ``fair_tight`` gateways, beyond the defaults."""
    phases: list[str]

    def variants(self, tight_budget: int) -> dict[str, list[str]]:
        """The gateways its phases use."""
        used = {PHASES[name][0] for name in self.phases}
        every = gateway_variants(tight_budget, self.fair_args)
        return {name: args for name, args in every.items() if name in used}


VLLM_SCHEDULING = (
    "--scheduling-policy fcfs --max-num-batched-tokens 2048 --long-prefill-token-threshold 0"
)
"""vLLM's own scheduling on the CPU build: first come first served, 2,048-token steps."""
NO_PROMPT_BOUND = ["--engine-max-in-flight-prompt-tokens", str(10**9)]
ENGINES = {
    "default_engine": EngineSession("", [], list(PHASES)),
    "vllm_scheduling": EngineSession(
        VLLM_SCHEDULING, NO_PROMPT_BOUND, ["alone", "flood_fairness_off", "flood_fairness_on"]
    ),
}
"""Engines measured: loraplex's defaults, then vLLM's own scheduling behind the gateway's
fair queue alone (as before the engine's scheduling was used)."""


def loraplex_defaults() -> dict[str, int]:
    """What the defaults come to on this machine's vLLM build."""
    settings = Settings()
    return {
        "engine_step_tokens": settings.resolved_step_tokens(),
        "engine_prefill_chunk_tokens": settings.resolved_prefill_chunk_tokens(),
        "engine_max_in_flight_prompt_tokens": settings.resolved_max_in_flight_prompt_tokens(),
        "engine_max_in_flight_tokens": FairGate(settings, Metrics()).replica_tokens,
    }


def run(config: NoisyConfig) -> dict[str, Any]:
    sessions, budget = {}, 0
    for name, session in ENGINES.items():
        engine_args, phases = session.engine_args, session.phases
        with running(WORK / "noisy", engine_args, session.variants) as gateways:
            for url in gateways.urls.values():  # warm each gateway's caches and the engine
                with httpx.Client(timeout=300) as client:
                    auth = {"authorization": f"Bearer {gateways.quiet_key}"}
                    first_token(client, url, auth, BASE_NAME)
            measured = {}
            for name_of_phase in phases:
                gateway, flooded = PHASES[name_of_phase]
                measured[name_of_phase] = phase(gateways, gateway, config, flooded)
            sessions[name] = {
                "engine_extra_args": engine_args,
                "fair_gateway_args": session.fair_args,
                "phases": measured,
            }
            budget = gateways.tight_budget
    return result(sessions, config, budget)


def with_ratios(phases: dict[str, Any]) -> dict[str, Any]:
    """Each phase's quiet p50 and p99 over the same figure alone."""
    alone = phases["alone"]["quiet_ttft"]
    return {
        name: {
            "p50": ratio(p["quiet_ttft"].get("p50_ms"), alone.get("p50_ms")),
            "p99": ratio(p["quiet_ttft"].get("p99_ms"), alone.get("p99_ms")),
        }
        for name, p in phases.items()
        if name != "alone"
    }


def summary_lines(sessions: dict[str, Any]) -> list[str]:
    lines = []
    for engine, session in sessions.items():
        for name, p in session["phases"].items():
            times = p["quiet_ttft"]
            p99_ratio = session["ratio_to_alone"].get(name, {}).get("p99")
            lines.append(
                f"{engine} / {name}: quiet TTFT p50 {times['p50_ms']:.0f} ms, "
                f"p99 {times['p99_ms']:.0f} ms"
                + (f" ({p99_ratio:.2f}x alone)" if p99_ratio is not None else "")
            )
    return lines


def result(sessions: dict[str, Any], config: NoisyConfig, tight_budget: int) -> dict[str, Any]:
    for session in sessions.values():
        session["ratio_to_alone"] = with_ratios(session["phases"])
    on = sessions["default_engine"]["ratio_to_alone"]["flood_fairness_on"]["p99"]
    met = on is not None and on <= TARGET_RATIO
    verdict = (
        f"quiet tenant's p99 TTFT beside the flood, fairness on: {on:.2f}x its p99 alone "
        f"(target <= {TARGET_RATIO}x): {'met' if met else 'NOT MET'}"
        if on is not None
        else "not measured"
    )
    return {
        "benchmark": "noisy_neighbour",
        "command": COMMAND,
        "machine": machine(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": {
            **asdict(config),
            "prompt_tokens": PROMPT_TOKENS,
            "flood_max_tokens": FLOOD_MAX_TOKENS,
            "tight_budget_tokens": tight_budget,
            "loraplex_defaults": loraplex_defaults(),
        },
        "engines": sessions,
        "target_ratio": TARGET_RATIO,
        "met": met,
        "verdict": verdict,
        "summary_lines": summary_lines(sessions),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a short run, for debugging")
    args = parser.parse_args(argv)
    config = NoisyConfig().quick() if args.quick else NoisyConfig()
    publish("noisy_neighbour", {**run(config), "quick": args.quick})


if __name__ == "__main__":
    main()
