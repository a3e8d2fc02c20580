"""Multi-adapter throughput (issue 9, item 3) on the vLLM CPU engine with the demo base.

Output tokens/s of a fixed batch of concurrent completions (ignore_eos, so every
request yields exactly ``max_tokens``), through loraplex, for the base alone and
for mixes of 1, 8 and 32 distinct adapters, requests spread uniformly or by
Zipf(1.1) popularity; reported as ratios to the base alone. Adapters are loaded
(one warm-up request each) before timing, so this is steady-state throughput,
not cold start.

Run: ``.venv/bin/python -m bench.multi_adapter``; writes
``bench/results/multi_adapter.json``.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from bench.engine_session import BASE_NAME, Session, session
from bench.gateway import machine
from bench.results import publish

COMMAND = ".venv/bin/python -m bench.multi_adapter"


@dataclass(frozen=True)
class MixConfig:
    """The batch each mix is timed on."""

    requests: int = 64
    """Completions per mix."""
    concurrency: int = 16
    """Requests in flight at once."""
    max_tokens: int = 32
    """Output tokens per request (ignore_eos)."""
    mixes: tuple[int, ...] = (1, 8, 32)
    """Distinct adapters per mix."""
    zipf_s: float = 1.1
    """Zipf exponent of the skewed mixes."""
    seed: int = 7


def models_for(names: list[str], requests: int, skew: str, zipf_s: float, seed: int) -> list[str]:
    """The model of each request: uniform round-robin over ``names`` or Zipf-weighted draws."""
    if skew == "uniform":
        return [names[i % len(names)] for i in range(requests)]
    weights = [(rank + 1) ** -zipf_s for rank in range(len(names))]
    return random.Random(seed).choices(names, weights, k=requests)


async def _complete(
    client: httpx.AsyncClient, s: Session, model: str, max_tokens: int, gate: asyncio.Semaphore
) -> int:
    body = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    async with gate:
        answer = await client.post(s.gateway_url + "/v1/completions", json=body, headers=s.auth())
    answer.raise_for_status()
    tokens: int = answer.json()["usage"]["completion_tokens"]
    return tokens


async def timed_batch(s: Session, models: list[str], config: MixConfig) -> dict[str, float]:
    gate = asyncio.Semaphore(config.concurrency)
    limits = httpx.Limits(max_connections=config.concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        for model in sorted(set(models)):  # load every adapter before timing
            await _complete(client, s, model, 1, gate)
        started = time.perf_counter()
        tokens = await asyncio.gather(
            *(_complete(client, s, m, config.max_tokens, gate) for m in models)
        )
        seconds = time.perf_counter() - started
    return {"output_tokens": sum(tokens), "seconds": seconds, "tokens_s": sum(tokens) / seconds}


def run(s: Session, config: MixConfig | None = None) -> dict[str, Any]:
    config = config or MixConfig()
    base_only = [BASE_NAME] * config.requests
    rows: list[dict[str, Any]] = [
        {"mix": "base only", **asyncio.run(timed_batch(s, base_only, config))}
    ]
    for count in config.mixes:
        for skew in ("uniform", "zipf"):
            if count == 1 and skew == "zipf":
                continue  # one adapter has no popularity skew
            names = s.adapter_names[-count:]
            models = models_for(names, config.requests, skew, config.zipf_s, config.seed)
            figures = asyncio.run(timed_batch(s, models, config))
            rows.append({"mix": f"{count} adapters, {skew}", **figures})
    # The base again at the end: the ratios divide by the mean of both base runs, and the
    # two say how far a shared machine drifted meanwhile (one base run once read 412 tokens/s
    # where the next session's read 581-799, making every ratio look 1.7x better).
    rows.append({"mix": "base only, again", **asyncio.run(timed_batch(s, base_only, config))})
    base = (rows[0]["tokens_s"] + rows[-1]["tokens_s"]) / 2
    for row in rows:
        row["ratio_to_base"] = row["tokens_s"] / base
    return {
        "config": asdict(config),
        "rows": rows,
        "summary_lines": [
            "ratios to the mean of the two base-only runs, the first and the last",
            *(
                f"{r['mix']}: {r['tokens_s']:.0f} output tokens/s = {r['ratio_to_base']:.2f}x base"
                for r in rows
            ),
        ],
    }


def result(figures: dict[str, Any]) -> dict[str, Any]:
    return {
        "benchmark": "multi_adapter",
        "command": COMMAND,
        "workload": "POST /v1/completions through loraplex, ignore_eos, demo base, vLLM CPU engine",
        **figures,
        "machine": machine(),
    }


def main() -> None:
    with session() as s:
        figures = run(s)
    publish("multi_adapter", result(figures))


if __name__ == "__main__":
    main()
