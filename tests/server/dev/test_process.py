"""The process runner, on tiny Python children: stops, stragglers, readiness, dying with a parent.

Deadlines here are generous: only what happens is asserted, never how fast.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from server.dev.fleet import free_port
from server.dev.process import NotReady, Process, ProcessExited

IGNORE_SIGTERM = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)"
SLEEP = "import time; time.sleep(120)"


def python(name: str, code: str, tmp_path: Path, **options: object) -> Process:
    """A Process running ``code`` (unstarted), logging to ``<tmp_path>/<name>.log``."""
    command = [sys.executable, "-u", "-c", textwrap.dedent(code)]
    return Process(name, command, tmp_path / f"{name}.log", **options)  # type: ignore[arg-type]


def logged(process: Process, text: str) -> Callable[[], bool]:
    """A probe: the child has written ``text`` to its log."""
    return lambda: text in process.tail(1000)


def gone(pid: int) -> bool:
    """No such process, or only its zombie (nobody may reap an orphan in a container)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return gone(pid)


@pytest.fixture
def started() -> Iterator[list[Process]]:
    """Processes a test starts; SIGKILLed with their groups afterwards, whatever happened."""
    processes: list[Process] = []
    yield processes
    for process in processes:
        process.kill()


def test_a_clean_stop_ends_the_process_by_sigterm(tmp_path: Path, started: list[Process]) -> None:
    child = python("sleeper", SLEEP, tmp_path, grace=60)
    started.append(child.start())
    assert child.alive
    assert child.stop() == -signal.SIGTERM
    assert not child.alive


def test_a_child_ignoring_sigterm_is_killed_after_the_grace(
    tmp_path: Path, started: list[Process]
) -> None:
    child = python(
        "stubborn", f"{IGNORE_SIGTERM}; print('ignoring', flush=True); {SLEEP}", tmp_path
    )
    started.append(child.start())
    child.wait_ready(logged(child, "ignoring"), timeout=30, interval=0.05)
    assert child.stop(grace=0.5) == -signal.SIGKILL


GRANDCHILD = """
import signal, time
signal.signal(signal.SIGTERM, lambda *_: print("grandchild got SIGTERM", flush=True))
print("ready", flush=True)
time.sleep(120)
"""
"""Says so when it gets SIGTERM, and lives on: only SIGKILL ends it."""

LEAVES_A_GRANDCHILD = f"""
    import os, select, signal, subprocess, sys, time
    grandchild = subprocess.Popen(
        [sys.executable, "-c", {GRANDCHILD!r}], stdout=subprocess.PIPE, text=True
    )
    grandchild.stdout.readline()  # its handler is in place

    def relay(*_):
        # Die only once the grandchild has answered (or surely never will), so that
        # what it heard is in the log before anything else happens to it.
        heard, _, _ = select.select([grandchild.stdout], [], [], 5)
        print(grandchild.stdout.readline().strip() if heard else "grandchild heard nothing")
        sys.stdout.flush()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, relay)
    print("grandchild", grandchild.pid, flush=True)
    time.sleep(120)
"""
"""A leader that dies of SIGTERM and leaves that grandchild behind."""


def _leader_and_grandchild(tmp_path: Path, started: list[Process]) -> tuple[Process, int]:
    leader = python("leader", LEAVES_A_GRANDCHILD, tmp_path)
    started.append(leader.start())
    leader.wait_ready(logged(leader, "grandchild "), timeout=30, interval=0.05)
    return leader, int(leader.tail(1000).split("grandchild ")[1].split()[0])


def test_stragglers_in_the_group_are_killed_after_the_leader_exits(
    tmp_path: Path, started: list[Process]
) -> None:
    leader, grandchild = _leader_and_grandchild(tmp_path, started)
    assert leader.stop() == -signal.SIGTERM
    assert wait_gone(grandchild), "the grandchild outlived the stop"
    assert "grandchild got SIGTERM" in leader.tail(), "the group was not asked to stop first"


def test_leader_only_leaves_the_leaders_children_to_it(
    tmp_path: Path, started: list[Process]
) -> None:
    leader, grandchild = _leader_and_grandchild(tmp_path, started)
    assert leader.stop(leader_only=True) == -signal.SIGTERM
    time.sleep(0.5)
    assert not gone(grandchild), "leader_only reached past the leader"
    assert "grandchild heard nothing" in leader.tail()
    leader.kill()  # the group, grandchild included
    assert wait_gone(grandchild)


def test_wait_ready_returns_once_the_url_answers(tmp_path: Path, started: list[Process]) -> None:
    port = free_port()
    code = f"""
        import time, http.server
        time.sleep(0.5)  # not listening at first: refused connections mean not yet
        http.server.test(http.server.SimpleHTTPRequestHandler, port={port}, bind="127.0.0.1")
    """
    server = python("http", code, tmp_path, cwd=tmp_path)
    started.append(server.start())
    took = server.wait_ready(url=f"http://127.0.0.1:{port}/", timeout=60, interval=0.1)
    assert took >= 0 and server.alive


def test_wait_ready_times_out_naming_the_last_probe_error(
    tmp_path: Path, started: list[Process]
) -> None:
    child = python("silent", f"print('still starting', flush=True); {SLEEP}", tmp_path)
    started.append(child.start())

    def refused() -> bool:
        raise ConnectionRefusedError("nobody listens")

    with pytest.raises(NotReady, match=r"silent not ready after 0\.5 s") as raised:
        child.wait_ready(refused, timeout=0.5, interval=0.1)
    assert "nobody listens" in str(raised.value)
    assert child.alive  # wait_ready reports; stopping is the caller's choice


def test_wait_ready_fails_fast_with_the_log_tail_when_the_child_exits(
    tmp_path: Path, started: list[Process]
) -> None:
    child = python("crasher", "print('cannot bind: port taken'); raise SystemExit(3)", tmp_path)
    started.append(child.start())
    began = time.monotonic()
    with pytest.raises(ProcessExited, match="crasher exited with status 3") as raised:
        child.wait_ready(lambda: False, timeout=120)
    assert time.monotonic() - began < 60  # far from the timeout: it did not wait it out
    assert "cannot bind: port taken" in str(raised.value)


def test_tail_is_the_last_lines_of_the_log(tmp_path: Path, started: list[Process]) -> None:
    child = python("counter", "for i in range(100): print(f'line {i}')", tmp_path)
    assert child.tail() == "(no log)"
    started.append(child.start())
    assert child.popen is not None and child.popen.wait(30) == 0
    assert child.tail(3) == "line 97\nline 98\nline 99"


PARENT = """
    import sys, time
    from pathlib import Path
    from server.dev.process import Process
    child = Process("orphan", [sys.executable, "-c", "import time; time.sleep(120)"],
                    Path(sys.argv[1]), dies_with_parent=sys.argv[2] == "yes").start()
    print(child.pid, flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("dies", [True, False], ids=["dies-with-parent", "outlives-parent"])
def test_a_sigkilled_parent_takes_its_child_along_only_if_asked(tmp_path: Path, dies: bool) -> None:
    argv = [sys.executable, "-c", textwrap.dedent(PARENT), str(tmp_path / "orphan.log")]
    parent = subprocess.Popen([*argv, "yes" if dies else "no"], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert not gone(child)
        parent.kill()
        parent.wait()
        if dies:
            assert wait_gone(child), "the child outlived its SIGKILLed parent"
        else:
            time.sleep(1.0)
            assert not gone(child), "without dies_with_parent the child should have lived on"
    finally:
        parent.kill()
        if not gone(child):
            psutil.Process(child).kill()
