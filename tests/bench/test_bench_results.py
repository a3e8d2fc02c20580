"""Result files, the summary's target checks, and CPU accounting from /proc."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import procs, report
from bench.results import IncompleteResult, read_results, write_result


def test_results_round_trip_and_need_their_provenance(tmp_path: Path) -> None:
    result = {"benchmark": "x", "command": "run x", "machine": {"cpus": 2}, "value": 1.5}
    path = write_result("x", result, tmp_path)
    assert path == tmp_path / "x.json"
    assert read_results(tmp_path) == {"x": result}
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(IncompleteResult, match="command, machine"):
        write_result("y", {"benchmark": "y"}, tmp_path)
    assert not (tmp_path / "y.json").exists()


def _gateway(ours_rps: float, ours_cpu: float, p50: float) -> dict[str, object]:
    def head(name: str, rps: float, cpu: float) -> dict[str, object]:
        return {"target": name, "max_rps": rps, "cpu_us_per_request": cpu, "rps_by_clients": {}}

    return {
        "added": {"loraplex": {"closed_1_p50_ms": p50, "open_1000_p99_ms": 4.0}},
        "headline": [
            head("loraplex", ours_rps, ours_cpu),
            head("vllm-router", 1000.0, 200.0),
            head("litellm", 50.0, 10_000.0),
        ],
    }


def test_gateway_checks_meet_and_miss_their_limits() -> None:
    met = {c.name: c.met for c in report.gateway_checks(_gateway(1000.0, 250.0, 0.4))}
    assert met["added p50 at 1 client"] is True
    assert met["added p99 at 1,000 req/s offered"] is True
    assert met["gateway CPU per request"] is True
    assert met["max req/s vs vllm-router"] is True
    assert met["max req/s vs LiteLLM"] is True
    assert met["added time to first streamed byte (p50)"] is None  # not measured

    missed = {c.name: c.met for c in report.gateway_checks(_gateway(400.0, 301.0, 0.6))}
    assert missed["added p50 at 1 client"] is False
    assert missed["gateway CPU per request"] is False
    assert missed["max req/s vs vllm-router"] is False
    assert missed["max req/s vs LiteLLM"] is False


def test_check_lines_say_a_miss_plainly() -> None:
    line = report.Check("cpu", 400.0, 300.0, True, "µs").line()
    assert "NOT MET" in line
    assert "not measured" in report.Check("cpu", None, 300.0, True, "µs").line()


BUSY = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\n"


def _parent_of_busy_child(script: Path, wait: bool) -> subprocess.Popen[bytes]:
    """A parent that only sleeps, with a child that burns CPU (waited for, or left running)."""
    launch = "subprocess.run" if wait else "subprocess.Popen"
    code = (
        f"import subprocess, sys, time; {launch}([sys.executable, {str(script)!r}]); time.sleep(30)"
    )
    return subprocess.Popen([sys.executable, "-c", code])


@pytest.mark.parametrize("wait", [False, True], ids=["live-child", "reaped-child"])
def test_cpu_seconds_include_child_processes(tmp_path: Path, wait: bool) -> None:
    script = tmp_path / "busy.py"
    script.write_text(BUSY.format(seconds=0.5))
    parent = _parent_of_busy_child(script, wait)
    try:
        deadline = time.monotonic() + 30
        charged = 0.0
        while charged < 0.45 and time.monotonic() < deadline:
            time.sleep(0.05)
            charged = procs.cpu_seconds(parent.pid)
        assert charged >= 0.45
    finally:
        parent.kill()
        parent.wait()


def test_settle_waits_for_a_busy_process_to_go_quiet(tmp_path: Path) -> None:
    script = tmp_path / "busy.py"
    script.write_text(BUSY.format(seconds=1.0) + "time.sleep(30)\n")
    busy = subprocess.Popen([sys.executable, str(script)])
    try:
        time.sleep(0.2)
        waited = procs.settle(busy.pid, window=0.2, timeout=10)
        assert 0.5 <= waited < 5
        assert procs.settle(busy.pid, window=0.2, timeout=10) < 0.5  # idle now: one window
    finally:
        busy.kill()
        busy.wait()


def test_a_process_that_never_gets_ready_is_stopped(tmp_path: Path) -> None:
    sleeper = procs.start(
        "sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "sleeper.log"
    )
    with pytest.raises(procs.StartTimeout, match="not ready"):
        procs.ready(sleeper, f"http://127.0.0.1:{procs.free_port()}/health", timeout=0.5)
    assert sleeper.popen.poll() is not None
