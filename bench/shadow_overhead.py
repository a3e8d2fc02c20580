"""Shadow traffic's cost to the real request (issue 17, item 8: "at most 1 ms added").

loraplex in front of the STUB upstream (``bench/stub_upstream.py``: what is measured is
the gateway), one tenant's adapter ``bot`` with version 1 in production and version 2
pushed. One closed-loop client sends chat requests for ``bot``, in rounds that alternate
between no shadow and a shadow on version 2 at share 1 (every request copied, the most
a shadow costs); per round: latency p50/p99 and the gateway's CPU per request (copies
included). Reported: the medians over rounds, the shadow's added p50/p99 beside the
unshadowed, and the copies the gateway answered (from its ``/metrics``).

Run: ``.venv/bin/python -m bench.shadow_overhead [--quick]``; writes
``bench/results/shadow.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import loadgen, procs, targets
from bench.gateway import machine
from bench.results import write_result
from registry.shadow import ShadowStore

WORK = Path(__file__).resolve().parent / ".work" / "shadow"
COMMAND = ".venv/bin/python -m bench.shadow_overhead"
ADAPTER = "bot"
SETTLE = 1.5
"""Seconds for the gateway to see an alias change (its routing cache holds a view ~1 s)."""


@dataclass(frozen=True)
class ShadowBenchConfig:
    duration: float = 5.0
    """Seconds each measured round lasts (after its warm-up)."""
    warmup: float = 0.5
    rounds: int = 4
    """Rounds per mode, alternating; the medians over them are reported."""

    def quick(self) -> ShadowBenchConfig:
        return replace(self, duration=1.0, rounds=2)


class Site:
    """The stub, loraplex in front of it, and its registry with the adapter's two versions."""

    def __init__(self, work: Path) -> None:
        from registry import Actor, Registry, open_blob_store
        from server.dev.demo_site import random_adapter

        self.stub = targets.start_stub(work)
        self.gateway = targets.start_loraplex(work, self.stub.url)
        home = work / "loraplex-home"
        self.registry = Registry(
            f"sqlite:///{home}/registry.db", open_blob_store(str(home / "blobs"))
        )
        principal = self.registry.authenticate(self.gateway.api_key)
        assert principal is not None and principal.tenant_id is not None
        self.tenant_id, self.actor = principal.tenant_id, Actor("bench", admin=True)
        for seed in (1, 2):
            weights = random_adapter(work / "tiny-base", work / f"adapter-{seed}", seed)
            self.registry.push_adapter(self.tenant_id, ADAPTER, weights, targets.MODEL, self.actor)
        self.registry.promote(self.tenant_id, ADAPTER, 1, self.actor)

    def shadow(self, on: bool) -> None:
        if on:
            self.registry.set_shadow(self.tenant_id, ADAPTER, 2, 1.0, self.actor)
        elif ShadowStore(self.registry).status(self.tenant_id, ADAPTER).version is not None:
            self.registry.clear_shadow(self.tenant_id, ADAPTER, self.actor)
        time.sleep(SETTLE)

    def copies_answered(self) -> float:
        with urllib.request.urlopen(self.gateway.url + "/metrics", timeout=10) as reply:
            text = reply.read().decode()
        found = re.findall(
            r'loraplex_shadow_copies_total\{outcome="answered",[^}]*\} ([\d.e+]+)', text
        )
        return sum(float(n) for n in found)

    def stop(self) -> None:
        self.registry.close()
        self.gateway.stop()
        self.stub.stop()


def _round(site: Site, spec: loadgen.RunSpec) -> dict[str, Any]:
    proc = site.gateway.proc
    assert proc is not None
    cpu_before, copies_before = procs.cpu_seconds(proc.pid), site.copies_answered()
    summary = loadgen.run(spec).summary()
    time.sleep(0.5)  # the last copies end
    cpu = procs.cpu_seconds(proc.pid) - cpu_before
    ok = max(1, summary["requests_ok"])
    return {
        "requests_ok": summary["requests_ok"],
        "requests_sent": summary["total_incl_warmup"],
        "errors": summary["errors"],
        "p50_ms": summary["latency"].get("p50_ms"),
        "p99_ms": summary["latency"].get("p99_ms"),
        "cpu_ms_per_request": 1000 * cpu / ok,
        "copies_answered": site.copies_answered() - copies_before,
    }


def _medians(rounds: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("p50_ms", "p99_ms", "cpu_ms_per_request")
    medians = {k: statistics.median(r[k] for r in rounds) for k in keys}
    medians["copies_per_request"] = sum(r["copies_answered"] for r in rounds) / max(
        1, sum(r["requests_sent"] for r in rounds)
    )  # warm-up requests are copied too
    return medians


def run(config: ShadowBenchConfig) -> dict[str, Any]:
    WORK.mkdir(parents=True, exist_ok=True)
    site = Site(WORK)
    try:
        workload = loadgen.Workload(site.gateway.url, model=ADAPTER, api_key=site.gateway.api_key)
        spec = loadgen.RunSpec(workload, duration=config.duration, warmup=config.warmup)
        rounds: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for index in range(config.rounds):
            for mode in ("off", "on") if index % 2 == 0 else ("on", "off"):
                site.shadow(mode == "on")
                rounds[mode].append(_round(site, spec))
                print(f"round {index + 1} shadow {mode}: {rounds[mode][-1]}", flush=True)
    finally:
        site.stop()
    off, on = _medians(rounds["off"]), _medians(rounds["on"])
    return {
        "benchmark": "shadow_overhead",
        "command": COMMAND,
        "machine": machine(),
        "config": config.__dict__,
        "rounds": rounds,
        "shadow_off": off,
        "shadow_on": on,
        "added_by_shadow": {
            "p50_ms": on["p50_ms"] - off["p50_ms"],
            "p99_ms": on["p99_ms"] - off["p99_ms"],
            "cpu_ms_per_request": on["cpu_ms_per_request"] - off["cpu_ms_per_request"],
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="one-second rounds, for debugging")
    args = parser.parse_args(argv)
    config = ShadowBenchConfig()
    report = run(config.quick() if args.quick else config)
    path = write_result("shadow", report)
    print(
        json.dumps({k: report[k] for k in ("shadow_off", "shadow_on", "added_by_shadow")}, indent=2)
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
