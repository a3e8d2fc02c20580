"""Adapter cold start (issue 9, item 2): time to first token for a never-seen adapter version
vs a warm one through loraplex, broken down, against vLLM loading the same adapter itself.

Through loraplex, a cold request is: the gateway resolves the name (registry
lookup), the engine's resolver plugin looks the version up, fetches its blob,
checks its hash, unpacks it into the engine's adapter cache, and vLLM loads it.
Timed here: the cold and warm TTFT through the gateway on the real vLLM CPU
engine; the engine's own ``loraplex_adapter_fetch_seconds`` metric; the
registry lookup and the blob fetch + hash check (local directory and S3 on a
real SeaweedFS server) timed in-process with the same registry code. The peer:
``POST /v1/load_lora_adapter`` with the same adapter's local path on the same
engine, then its first request.

Run: ``.venv/bin/python -m bench.cold_start``; writes ``bench/results/cold_start.json``.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.engine_session import WORK, Session, engine_metric, first_token, session
from bench.gateway import machine
from bench.registry_bench import S3_BUCKET, s3_client, s3_endpoint
from bench.results import publish
from registry import S3BlobStore
from server.gateway.tenancy import Tenancy

COMMAND = ".venv/bin/python -m bench.cold_start"
SAMPLES = 9
FETCH_METRIC = "loraplex_adapter_fetch_seconds"
PENALTY_FACTOR = 1.2


def _warm_ttft(client: httpx.Client, url: str, headers: dict[str, str], model: str) -> float:
    """Median TTFT of a few requests once ``model`` is loaded."""
    first_token(client, url, headers, model)
    return statistics.median(first_token(client, url, headers, model)[0] for _ in range(3))


def through_loraplex(client: httpx.Client, s: Session) -> dict[str, Any]:
    name, _ = s.fresh_adapter()
    before = engine_metric(client, s, FETCH_METRIC)
    cold = first_token(client, s.gateway_url, s.auth(), name)[0]
    after = engine_metric(client, s, FETCH_METRIC)
    fetch = _metric_delta(before, after)
    warm = _warm_ttft(client, s.gateway_url, s.auth(), name)
    return {"adapter": name, "cold_ttft_s": cold, "warm_ttft_s": warm, "engine_fetch_s": fetch}


def _metric_delta(before: dict[str, float], after: dict[str, float]) -> float | None:
    sums = [k for k in after if k.split("{")[0].endswith("_sum")]
    if not sums:
        return None
    return sum(after[k] - before.get(k, 0.0) for k in sums)


def vllm_direct(client: httpx.Client, s: Session, index: int) -> dict[str, Any]:
    """vLLM's own path: load the adapter's local directory by name, then request it."""
    _, folder = s.fresh_adapter()
    name = f"direct-{index}"
    started = time.perf_counter()
    answer = client.post(
        s.engine_url + "/v1/load_lora_adapter",
        json={"lora_name": name, "lora_path": str(folder)},
        headers=s.auth(engine=True),
    )
    load = time.perf_counter() - started
    answer.raise_for_status()
    cold = first_token(client, s.engine_url, s.auth(engine=True), name)[0]
    warm = _warm_ttft(client, s.engine_url, s.auth(engine=True), name)
    return {"load_call_s": load, "first_ttft_s": cold, "warm_ttft_s": warm}


def registry_lookups(s: Session) -> dict[str, float]:
    """The gateway's routing lookup (its cache missed) and the resolver's lookup by
    LoRA name, in process, with the gateway's and the resolver's own code.

    Medians over every adapter of the session, each asked for once: a single timing is
    mostly the first query's own set-up (it once read 5 ms where the median is 1).
    """

    async def gateway_side() -> tuple[list[float], list[str]]:
        tenancy = Tenancy(s.registry)
        took, lora_names = [], []
        for name in s.adapter_names:
            started = time.perf_counter()
            view = await tenancy.routing(s.tenant_id, name)
            took.append(time.perf_counter() - started)
            assert view is not None
            lora_names.append(view.versions[max(view.versions)].lora_name)
        return took, lora_names

    gateway, lora_names = asyncio.run(gateway_side())
    resolver = []
    for lora_name in lora_names:
        started = time.perf_counter()
        s.registry.version_by_lora_name(lora_name)
        resolver.append(time.perf_counter() - started)
    return {
        "gateway_lookup_s": statistics.median(gateway),
        "resolver_lookup_s": statistics.median(resolver),
    }


def blob_fetches(s: Session, work: Path) -> dict[str, float]:
    """Blob fetch with its hash check (the store's own ``fetch``), local dir and S3."""
    view = s.registry.routing_view(s.tenant_id, s.adapter_names[0])
    found = s.registry.version_by_lora_name(view.versions[-1].lora_name)
    local = s.registry.blobs
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle.tar"
        out["fetch_local_dir_s"] = _timed_fetch(local, found, bundle)
        started = time.perf_counter()
        hashlib.sha256(bundle.read_bytes()).hexdigest()
        out["hash_check_s"] = time.perf_counter() - started
        out["bundle_bytes"] = bundle.stat().st_size
        with s3_endpoint(work) as endpoint:
            s3 = S3BlobStore(S3_BUCKET, "blobs", endpoint_url=endpoint, client=s3_client(endpoint))
            s3.put(found.blob_key, bundle)
            out["fetch_s3_s"] = _timed_fetch(s3, found, Path(tmp) / "from-s3.tar")
    return out


def _timed_fetch(store: Any, found: Any, dest: Path) -> float:
    started = time.perf_counter()
    store.fetch(found.blob_key, found.blob_sha256, dest)
    return time.perf_counter() - started


def run(s: Session) -> dict[str, Any]:
    with httpx.Client(timeout=300) as client:
        first_token(client, s.gateway_url, s.auth(), "demo-base")  # warm the engine itself
        ours = [through_loraplex(client, s) for _ in range(SAMPLES)]
        direct = [vllm_direct(client, s, i) for i in range(SAMPLES)]
    steps = {**registry_lookups(s), **blob_fetches(s, WORK)}
    return summarize(ours, direct, steps)


def summarize(
    ours: list[dict[str, Any]], direct: list[dict[str, Any]], steps: dict[str, Any]
) -> dict[str, Any]:
    def median(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    penalty_ours = median(ours, "cold_ttft_s") - median(ours, "warm_ttft_s")
    penalty_vllm = (
        median(direct, "load_call_s")
        + median(direct, "first_ttft_s")
        - median(direct, "warm_ttft_s")
    )
    fetch = steps["fetch_local_dir_s"]
    budget = PENALTY_FACTOR * penalty_vllm + fetch
    met = penalty_ours <= budget
    verdict = (
        f"cold-start penalty through loraplex {penalty_ours * 1000:.0f} ms vs vLLM's direct load "
        f"{penalty_vllm * 1000:.0f} ms + blob fetch {fetch * 1000:.1f} ms: target "
        f"(<= 1.2x + fetch = {budget * 1000:.0f} ms) {'met' if met else 'NOT MET'}"
    )
    return {
        "through_loraplex": ours,
        "vllm_direct": direct,
        "registry_steps": steps,
        "penalty_loraplex_s": penalty_ours,
        "penalty_vllm_direct_s": penalty_vllm,
        "target_budget_s": budget,
        "verdict": verdict,
        "summary_lines": summary_lines(ours, direct, steps),
    }


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def summary_lines(
    ours: list[dict[str, Any]], direct: list[dict[str, Any]], steps: dict[str, Any]
) -> list[str]:
    def median(rows: list[dict[str, Any]], key: str) -> str:
        return _ms(statistics.median(r[key] for r in rows))

    engine_fetch = ", ".join(_ms(r["engine_fetch_s"]) for r in ours)
    return [
        f"TTFT through loraplex (median of {len(ours)}): cold {median(ours, 'cold_ttft_s')}, "
        f"warm {median(ours, 'warm_ttft_s')}",
        f"vLLM direct: load_lora_adapter {median(direct, 'load_call_s')}, then first TTFT "
        f"{median(direct, 'first_ttft_s')}, warm {median(direct, 'warm_ttft_s')}",
        f"breakdown (in process, medians): gateway registry lookup "
        f"{_ms(steps['gateway_lookup_s'])}, resolver lookup "
        f"{_ms(steps['resolver_lookup_s'])}, blob fetch + hash check: local dir "
        f"{_ms(steps['fetch_local_dir_s'])} / S3 {_ms(steps['fetch_s3_s'])} (hash alone "
        f"{_ms(steps['hash_check_s'])}, {steps['bundle_bytes'] / 1e6:.1f} MB); engine-side "
        f"fetch metric per cold request: {engine_fetch}",
    ]


def result(figures: dict[str, Any]) -> dict[str, Any]:
    return {
        "benchmark": "cold_start",
        "command": COMMAND,
        "workload": "stream /v1/completions, 4 tokens, ignore_eos; demo base, vLLM CPU engine",
        "peer": "vLLM /v1/load_lora_adapter from a local path on the same engine",
        **figures,
        "machine": machine(),
    }


def main() -> None:
    with session() as s:
        figures = run(s)
    publish("cold_start", result(figures))


if __name__ == "__main__":
    main()
