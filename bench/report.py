"""The Markdown summary and plots from ``bench/results/*.json``.

Each figure names its command, peer and workload, and the machine it ran on;
each issue-9 target is checked and a miss is said plainly. Placement figures are
taken from ``placement.json`` as written by ``bench/placement.py`` (not recomputed).

Run: ``.venv/bin/python -m bench.report``; writes ``bench/results/SUMMARY.md``
and ``bench/results/*.png``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.results import RESULTS, read_results
from bench.stats import ratio


@dataclass(frozen=True)
class Check:
    """One issue-9 target and whether the measured figure meets it."""

    name: str
    measured: float | None
    limit: float
    at_most: bool
    """True: the figure must be <= limit; False: >= limit."""
    unit: str

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured <= self.limit if self.at_most else self.measured >= self.limit

    def line(self) -> str:
        sign = "≤" if self.at_most else "≥"
        verdict = {True: "met", False: "**NOT MET**", None: "not measured"}[self.met]
        shown = "n/a" if self.measured is None else f"{self.measured:,.2f} {self.unit}"
        return f"| {self.name} | {sign} {self.limit:,.2f} {self.unit} | {shown} | {verdict} |"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def gateway_checks(gateway: dict[str, Any]) -> list[Check]:
    """Issue 9 item 1's targets for loraplex."""
    added = gateway["added"].get("loraplex", {})
    heads = {h["target"]: h for h in gateway["headline"]}
    ours = heads.get("loraplex", {})
    router_rps = heads.get("vllm-router", {}).get("max_rps")
    litellm_rps = heads.get("litellm", {}).get("max_rps")
    return [
        Check("added p50 at 1 client", added.get("closed_1_p50_ms"), 0.5, True, "ms"),
        Check("added p99 at 1,000 req/s offered", added.get("open_1000_p99_ms"), 5.0, True, "ms"),
        Check("gateway CPU per request", ours.get("cpu_us_per_request"), 300.0, True, "µs"),
        Check("max req/s vs vllm-router", ratio(ours.get("max_rps"), router_rps), 0.5, False, "x"),
        Check("max req/s vs LiteLLM", ratio(ours.get("max_rps"), litellm_rps), 20.0, False, "x"),
        Check(
            "added time to first streamed byte (p50)",
            added.get("stream_ttfb_p50_ms"),
            1.0,
            True,
            "ms",
        ),
        Check(
            "same, 1 stream at a time (no queueing) (p50)",
            added.get("stream_1_ttfb_p50_ms"),
            1.0,
            True,
            "ms",
        ),
    ]


def gateway_section(gateway: dict[str, Any]) -> list[str]:
    machine = gateway["machine"]
    lines = [
        f"## {TITLES['gateway']}",
        "",
        f"Command: `{gateway['command']}`. Upstream: {gateway['upstream']}. "
        f"Workload: {gateway['workload']}. Machine: {_machine(machine)} at the end "
        "(shared machine: latency is noisy; CPU per request is the steadiest figure). "
        "Where a loraplex target is missed, the profile in the next section shows where "
        "the time goes.",
        "",
        "| target | version | max req/s (16 / 64 / 256 clients) | CPU µs/request | "
        "added p50 / p99 @1 client (ms) | added p50 / p99 @200 req/s | "
        "added p50 / p99 @1,000 req/s | 16 streams: added TTFB p50 / last-event p50 (ms) | "
        "1 stream: added TTFB p50 / p99 (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for head in gateway["headline"]:
        name = head["target"]
        run = gateway["targets"][name]
        added = gateway["added"].get(name, {})
        rps = " / ".join(f"{v:,.0f}" for v in head["rps_by_clients"].values())
        cpu = head["cpu_us_per_request"]
        if name == "stub":
            cpu = _stub_cpu(gateway)
            name = "stub direct (baseline)"
        lines.append(
            f"| {name} | {run['version']} | {rps} | {_fmt(cpu, 0)} | "
            f"{_pair(added, 'closed_1')} | {_pair(added, 'open_200')} | "
            f"{_pair(added, 'open_1000')} | "
            f"{_fmt(added.get('stream_ttfb_p50_ms'))} / {_fmt(added.get('stream_last_p50_ms'))} | "
            f"{_pair(added, 'stream_1_ttfb')} |"
        )
    lines += [
        "",
        "Stub direct row: the stub's own ceiling and CPU (it must never be the bottleneck); "
        "its latencies are the baseline every `added` figure subtracts. CPU µs/request: the "
        "target's processes (all of them, from /proc) over the 16/64/256-client runs, the "
        "lowest of the three. Open-loop latency counts from each request's scheduled send "
        "time; a target past its capacity queues, so its figure there is seconds, not "
        "milliseconds. Open loop: each target runs up to "
        f"{gateway['config'].get('open_repeats', 1)} times per rate (once, past its "
        "capacity), each run right after the same load sent straight to the stub; the added "
        "figure is the median of those pairs' differences, so a target and its baseline see "
        "the same moment of a noisy host. LiteLLM runs without a master key; loraplex "
        "authenticates every request.",
        "",
        *_noise_lines(gateway),
        "| loraplex target | limit | measured | verdict |",
        "|---|---|---|---|",
        *[check.line() for check in gateway_checks(gateway)],
        "",
    ]
    return lines


def _noise_lines(gateway: dict[str, Any]) -> list[str]:
    """How noisy the host was (CPU steal), and how late loraplex's own event loop ran."""
    steals = [
        run["host_steal_share"]
        for result in gateway["targets"].values()
        for run in _runs(result)
        if "host_steal_share" in run
    ]
    lines = []
    if steals:
        lines.append(
            f"Host noise: the hypervisor took {statistics.median(steals):.1%} of this machine's "
            f"CPU time for other guests during the median run ({max(steals):.1%} in the worst): "
            "time every process here, load generator included, waited for a CPU."
        )
        lines.append("")
    lag = gateway["targets"].get("loraplex", {}).get("loop_lag_open")
    if lag and lag["timers"]:
        within = ", ".join(
            f"{share:.1%} within {bound} ms"
            for bound, share in lag["share_within_ms"].items()
            if bound in ("1", "5", "25", "100")
        )
        lines.append(
            f"loraplex's event loop during its open-loop runs: of {lag['timers']:,.0f} timers "
            f"due every 50 ms (`loraplex_event_loop_lag_seconds`), {within} of their time. "
            "A request waits as long as the loop is late; the rest of its latency is spent "
            "outside the gateway's loop (the kernel's scheduler, the other processes)."
        )
    return [*lines, ""] if lines else []


def _runs(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every load run recorded for one target."""
    runs = [result[k] for k in ("closed_1", "stream", "stream_1") if k in result]
    runs += list(result.get("closed", {}).values())
    for repeated in result.get("open", {}).values():
        runs += repeated.get("runs", [repeated])
    return runs


def _stub_cpu(gateway: dict[str, Any]) -> float | None:
    values = [v for v in gateway.get("stub_cpu_us_per_request", {}).values() if v]
    return min(values) if values else None


def _pair(added: dict[str, Any], prefix: str) -> str:
    if not added:
        return "baseline"
    return f"{_fmt(added.get(prefix + '_p50_ms'))} / {_fmt(added.get(prefix + '_p99_ms'))}"


def _loadavg(machine: dict[str, Any]) -> str:
    values = machine.get("load_average")
    return " / ".join(f"{v:.2f}" for v in values) if values else "n/a"


def placement_section(placement: dict[str, Any]) -> list[str]:
    config = placement["config"]
    lines = [
        f"## {TITLES['placement']} (from `placement.json`)",
        "",
        f"Command: `{placement['command']}` (simulator driving `router.placement`). Workload: "
        f"{config['adapters']} adapters, Zipf({config['zipf_s']}), {config['replicas']} replicas "
        f"x {config['slots']} slots, {config['requests']:,} requests. "
        f"Machine: {placement['machine']['platform']}.",
        "",
        "| policy | hit rate | adapter loads / 1,000 req | max/mean load (busy) |",
        "|---|---|---|---|",
    ]
    for row in placement["results"]:
        lines.append(
            f"| {row['label']} | {row['hit_rate']:.1%} | {row['loads_per_1k']:.0f} | "
            f"{row['busy_max_mean']:.3f} |"
        )
    lines += ["", f"Verdict: {placement['verdict']}", ""]
    return lines


TITLES = {
    "gateway": "Gateway cost (item 1)",
    "profile_loraplex": "Where loraplex's gateway time goes (py-spy, item 1)",
    "gateway_vllm": "Gateway cost on the real vLLM CPU engine (item 1)",
    "cold_start": "Adapter cold start (item 2)",
    "multi_adapter": "Multi-adapter throughput (item 3)",
    "placement": "Placement at fleet scale (item 4)",
    "registry": "Registry (item 6)",
    "routing": "Routed models: what a routing decision costs (issue 19)",
}
"""Section order and titles; results with other names follow, titled by their file name."""


def generic_section(name: str, result: dict[str, Any]) -> list[str]:
    """A result's command, workload, peer, machine, summary lines and verdict."""
    # Results written outside `make bench` (the chaos soak's) may lack a command or machine.
    lines = [f"## {TITLES.get(name, name)}", "", f"Command: `{result.get('command', '?')}`."]
    for key in ("workload", "peer", "upstream"):
        if key in result:
            lines[-1] += f" {key.capitalize()}: {result[key]}."
    if "machine" in result:
        lines[-1] += f" Machine: {_machine(result['machine'])}."
    lines.append("")
    lines += [f"- {line}" for line in result.get("summary_lines", [])]
    if "verdict" in result:
        lines += ["", f"Verdict: {result['verdict']}"]
    return [*lines, ""]


def _machine(machine: dict[str, Any]) -> str:
    parts = [f"{machine['cpus']} CPUs" if "cpus" in machine else "", machine.get("platform", "")]
    if "load_average" in machine:
        parts.append(f"load average {_loadavg(machine)}")
    return ", ".join(p for p in parts if p)


SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "gateway": gateway_section,
    "placement": placement_section,
}


def summary(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# loraplex benchmarks",
        "",
        "Written by `bench/run.sh` (`make bench`) through `.venv/bin/python -m bench.report`. "
        "Benchmarks print numbers; they never assert timings. Targets from issue 9.",
        "",
    ]
    ordered = [n for n in TITLES if n in results] + [n for n in results if n not in TITLES]
    for name in ordered:
        result = results[name]
        section = SECTIONS.get(name)
        lines += section(result) if section else generic_section(name, result)
    missing = [
        n for n in ("gateway", "cold_start", "multi_adapter", "registry") if n not in results
    ]
    if missing:
        lines += ["## Not measured in this run", "", *[f"- {n}" for n in missing], ""]
    return "\n".join(lines)


def plot_gateway(gateway: dict[str, Any], folder: Path) -> list[Path]:
    """Bar charts: max req/s and CPU per request per target (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = gateway["headline"]
    names = [h["target"] for h in heads]
    written = []
    for key, label, title, filename in (
        ("max_rps", "requests/s", "max req/s, best of 16/64/256 clients", "gateway_rps.png"),
        ("cpu_us_per_request", "CPU µs / request", "gateway CPU per request", "gateway_cpu.png"),
    ):
        values = [h[key] or 0 for h in heads]
        if key == "cpu_us_per_request":
            values[names.index("stub")] = _stub_cpu(gateway) or 0
        figure, axis = plt.subplots(figsize=(7, 3.5))
        axis.bar(names, values, color=["#888", "#d62", "#36c", "#393"][: len(names)])
        axis.set_yscale("log")
        axis.set_ylabel(label)
        axis.set_title(f"{title} (upstream: stub)")
        for x, value in enumerate(values):
            axis.annotate(f"{value:,.0f}", (x, value), ha="center", va="bottom", fontsize=8)
        figure.tight_layout()
        path = folder / filename
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def plot_multi_adapter(result: dict[str, Any], folder: Path) -> Path:
    """Output tokens/s of each adapter mix as a ratio to the base alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.barh([r["mix"] for r in rows], [r["ratio_to_base"] for r in rows], color="#36c")
    axis.axvline(1.0, color="#888", linewidth=1)
    axis.invert_yaxis()
    axis.set_xlabel("output tokens/s, ratio to the base alone")
    axis.set_title("Multi-adapter throughput, vLLM CPU engine, demo base")
    figure.tight_layout()
    path = folder / "multi_adapter.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main() -> None:
    results = read_results(RESULTS)
    (RESULTS / "SUMMARY.md").write_text(summary(results))
    if "gateway" in results:
        plot_gateway(results["gateway"], RESULTS)
    if "multi_adapter" in results:
        plot_multi_adapter(results["multi_adapter"], RESULTS)
    print((RESULTS / "SUMMARY.md").read_text())


if __name__ == "__main__":
    main()
