"""Where the loraplex gateway's CPU goes: a py-spy profile under load in front of the stub.

Starts the stub and loraplex (as ``bench.gateway`` does), drives it with
closed-loop clients, samples the gateway process with py-spy (installed into
.venv), and folds the samples into the functions with the most inclusive and
self time. The summary quotes it wherever a gateway target is missed.

Run: ``.venv/bin/python -m bench.profile_gateway``; writes
``bench/results/profile_loraplex.json`` (and the raw folded stacks under
``bench/.work/profile``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from bench import loadgen, targets
from bench.gateway import machine
from bench.results import publish

WORK = Path(__file__).resolve().parent / ".work" / "profile"
COMMAND = ".venv/bin/python -m bench.profile_gateway"
TOP = 25


class PySpyMissing(RuntimeError):
    """py-spy is not installed in this virtualenv: `.venv/bin/pip install py-spy`."""


def fold(lines: list[str]) -> tuple[int, Counter[str], Counter[str]]:
    """(samples, inclusive, self) per frame from py-spy's raw folded output."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    return total, inclusive, own


LIBRARIES = (
    "httpcore",
    "httpx",
    "aiohttp",
    "anyio",
    "starlette",
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "prometheus_client",
    "json",
    "server/",
    "router/",
    "registry/",
    "asyncio",
)
"""Where a sample's time is charged: the innermost frame from one of these."""


SOCKET_WRITES = (
    "selector_events.py:1057",
    "_SelectorSocketTransport.write",
    "JoinedWrites.flush",  # the gateway's answer to its client (server/gateway/transport.py)
    "_Connection.send",  # the request to the engine (server/gateway/proxy.py)
    "StreamWriter._writelines",  # aiohttp's request write
)
"""Leaf frames that are a transport write: with uvloop the send system call runs inside them."""


def category(frames: list[str]) -> str:
    """The bucket of one sampled stack: a kernel write, idle, or the innermost known library."""
    leaf = frames[-1]
    if any(write in leaf for write in SOCKET_WRITES):
        return "socket write (syscall, runs loopback TCP)"
    if "selectors.py" in leaf:
        return "idle (epoll)"
    if "Runner.run (asyncio/runners.py" in leaf:
        # uvloop's loop is C: py-spy sees its epoll waits, socket reads and callbacks as this.
        return "event loop in C (uvloop: epoll, socket reads, callbacks)"
    for frame in reversed(frames):
        for library in LIBRARIES:
            if f"({library}" in frame or f"/{library}" in frame:
                return library.rstrip("/") + (" (loraplex)" if library.endswith("/") else "")
    return "other"


def by_library(lines: list[str]) -> dict[str, float]:
    """Share of samples per category, largest first."""
    counts: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            counts[category(stack.split(";"))] += int(count)
    total = sum(counts.values())
    return {name: n / total for name, n in counts.most_common()} if total else {}


def profile(clients: int, seconds: float) -> dict[str, Any]:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        raise PySpyMissing(PySpyMissing.__doc__)
    WORK.mkdir(parents=True, exist_ok=True)
    stub = targets.start_stub(WORK)
    gateway = targets.start_loraplex(WORK, stub.url)
    folded = WORK / f"loraplex-{clients}.folded"
    try:
        assert gateway.proc is not None
        workload = loadgen.Workload(url=gateway.url, model=targets.MODEL, api_key=gateway.api_key)
        spec = loadgen.RunSpec(workload, clients=clients, duration=seconds + 2, warmup=0.0)
        load = threading.Thread(target=loadgen.run, args=(spec,))
        load.start()
        argv = [spy, "record", "-p", str(gateway.proc.pid), "-d", str(int(seconds)), "-r", "250"]
        argv += ["-f", "raw", "-o", str(folded), "--nonblocking"]
        subprocess.run(argv, check=True, capture_output=True)
        load.join()
    finally:
        gateway.stop()
        stub.stop()
    lines = folded.read_text().splitlines()
    total, inclusive, own = fold(lines)
    return {
        "clients": clients,
        "samples": total,
        "by_library": by_library(lines),
        "top_inclusive": [[f, n / total] for f, n in inclusive.most_common(TOP)],
        "top_self": [[f, n / total] for f, n in own.most_common(TOP)],
    }


def summary_lines(runs: list[dict[str, Any]]) -> list[str]:
    lines = []
    for run in runs:
        shares = ", ".join(f"{name} {share:.0%}" for name, share in run["by_library"].items())
        lines.append(f"{run['clients']} client(s), {run['samples']} samples: {shares}")
        hot = "; ".join(f"{row[0]} {row[1]:.0%}" for row in run["top_self"][:6])
        lines.append(f"{run['clients']} client(s) top self time: {hot}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    runs = [profile(clients, args.seconds) for clients in (1, 64)]
    result: dict[str, Any] = {
        "benchmark": "profile_loraplex",
        "command": COMMAND,
        "workload": "closed loop against loraplex in front of the stub; py-spy 250 Hz",
        "runs": runs,
        "summary_lines": summary_lines(runs),
        "machine": machine(),
    }
    publish("profile_loraplex", result)


if __name__ == "__main__":
    main()
