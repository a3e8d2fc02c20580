"""Starting and watching the processes a benchmark measures.

Each runs as a :class:`server.dev.process.Process` (its own process group,
a log of this run alone). CPU time comes from ``/proc/<pid>/stat`` summed over
a process and all its descendants (and their reaped children), so
multi-process targets (uvicorn workers, engine workers) are charged in full.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from server.dev.process import Process, ProcessFailed

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_GRACE = 10.0
"""Seconds a stopped target gets between SIGTERM and SIGKILL."""

StartTimeout = ProcessFailed
"""What a target that never became ready raises (its message ends with its log's tail)."""


def start(
    name: str,
    argv: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Process:
    """Start ``argv`` in its own process group (so stopping it stops its children too)."""
    environment = {**os.environ, **(env or {})}
    process = Process(name, argv, log, environment, cwd, truncate_log=True, grace=STOP_GRACE)
    return process.start()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ready(proc: Process, url: str, timeout: float) -> float:
    """Seconds until ``url`` answers 2xx; a process that never got there is stopped first."""
    try:
        return proc.wait_ready(url=url, timeout=timeout, interval=0.25)
    except BaseException:
        proc.stop()
        raise


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after it start past ')'.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from the ppid field of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its descendants, live or already reaped.

    utime + stime of every live member, plus cutime + cstime: the time of
    children that exited and were waited for (short-lived workers count too).
    """
    total = 0
    for member in descendants(pid):
        fields = _stat_fields(member)
        if fields is not None:
            # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / CLOCK_TICKS


def settle(pid: int, busy_below: float = 0.1, window: float = 0.5, timeout: float = 30.0) -> float:
    """Wait until ``pid``'s tree uses under ``busy_below`` of a core; the seconds waited.

    A saturated target keeps working on requests its clients gave up on; the
    next run must not inherit that backlog.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = cpu_seconds(pid)
        time.sleep(window)
        if (cpu_seconds(pid) - before) / window < busy_below:
            break
    return time.monotonic() - started


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def host_cpu() -> list[int]:
    """The machine's CPU time counters (``/proc/stat``'s first line, in clock ticks)."""
    with open("/proc/stat") as stat:
        return [int(v) for v in stat.readline().split()[1:]]


def steal_share(before: list[int], after: list[int]) -> float:
    """Share of the machine's time the hypervisor gave to other guests between two readings.

    Time stolen from a 2-core guest is time every process here waited for a CPU:
    the figure that says how noisy a latency run's host was.
    """
    spent = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(spent[:8])  # user..steal; guest time is already counted in user
    return spent[7] / total if total else 0.0
